"""Head config dataclasses: everything that rebuilds a head's module, as JSON.

``embed_dim`` is the encoder's width; ``labels`` are the names the outputs stand for (written to the
bundle's ``labels.csv``); ``target`` says which cache field the head was trained on, so an exporter
and an evaluator know what the outputs mean without the training config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASKS = ("classify", "regress", "segment", "anomaly", "ground", "localize")


@dataclass
class HeadConfig:
    """Fields shared by every head."""

    task: str = ""
    embed_dim: int = 768
    labels: list[str] = field(default_factory=list)
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class ProbeConfig(HeadConfig):
    """Classification (``labels`` = classes) or regression (``labels`` = target names) probe.

    ``pooling``: ``linear`` (class token + mean patch token) or ``attentive`` (a learnt query
    attending over patch tokens, plus the class token). ``target_mean``/``target_std`` normalise
    regression targets (stored so predictions come back in the target's units).

    >>> ProbeConfig(task="classify", embed_dim=64, labels=["brain", "knee"], target="body_region")
    """

    pooling: str = "linear"
    hidden: int = 0
    num_heads: int = 4
    dropout: float = 0.0
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    crop: list[int] = field(default_factory=lambda: [64, 64, 64])

    def __post_init__(self) -> None:
        if self.pooling not in ("linear", "attentive"):
            raise ValueError(f"probe pooling must be 'linear' or 'attentive', got {self.pooling!r}")


@dataclass
class SegmentConfig(HeadConfig):
    """UNETR-style decoder from several encoder depths (``layers``, 1-based) to full-resolution masks.

    ``labels[0]`` is the background. ``groups`` maps each foreground label to source label names or
    glob patterns (``{"frontal": ["Frontal_*", "Precentral_*"]}``) so atlas regions merge into a few
    classes; empty ``groups`` with ``target="lesion"`` means the binary lesion mask. ``crop`` is the
    training view and the sliding-window size for larger volumes.

    >>> SegmentConfig(task="segment", embed_dim=64, labels=["background", "lesion"], layers=[1, 2, 2], target="lesion")
    """

    layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    channels: int = 16
    crop: list[int] = field(default_factory=lambda: [64, 64, 64])
    groups: dict[str, list[str]] = field(default_factory=dict)
    patch_size: int = 8


@dataclass
class AnomalyConfig(SegmentConfig):
    """Voxel-wise anomaly map in [0, 1].

    ``mode="supervised"``: a one-channel segmentation decoder trained on lesion masks.
    ``mode="unsupervised"``: a model of normal patch tokens per position (``method`` ``gaussian``:
    per-position mean and diagonal variance; ``knn``: distance to the ``k`` nearest normal tokens at
    that position) on a fixed ``stats_grid``, calibrated on normal scores so the median normal
    token maps near 0 and the 99th percentile to 0.5.

    Normal tokens of different sequences and body regions differ far more than a lesion differs
    from its own tissue, so the unsupervised model also keeps one set of statistics per
    ``condition_on`` group (e.g. ``brain/T1``) with enough normal studies; ``normal_groups`` lists
    the groups fitted (empty: one pooled model, as heads saved before groups existed).
    """

    mode: str = "supervised"
    method: str = "gaussian"
    k: int = 3
    stats_grid: list[int] = field(default_factory=lambda: [8, 8, 8])
    bank_size: int = 64
    condition_on: list[str] = field(default_factory=lambda: ["body_region", "sequence"])
    normal_groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("supervised", "unsupervised"):
            raise ValueError(f"anomaly mode must be 'supervised' or 'unsupervised', got {self.mode!r}")
        if self.method not in ("gaussian", "knn"):
            raise ValueError(f"anomaly method must be 'gaussian' or 'knn', got {self.method!r}")


@dataclass
class GroundConfig(HeadConfig):
    """Text embedding (``text_dim``) + patch tokens -> heatmap, mask (``threshold``) and box.

    ``text_source`` records which text encoder made the embeddings (the aligned model or a local
    BERT folder), because a grounding head only understands embeddings from that encoder.
    """

    text_dim: int = 512
    hidden: int = 128
    threshold: float = 0.5
    text_source: str = ""
    crop: list[int] = field(default_factory=lambda: [64, 64, 64])
    patch_size: int = 8


@dataclass
class LocalizeConfig(HeadConfig):
    """Boxes of named structures (``labels``) from per-structure token heatmaps.

    ``groups`` maps each structure to source label names or glob patterns, as in
    :class:`SegmentConfig`.
    """

    hidden: int = 128
    threshold: float = 0.5
    groups: dict[str, list[str]] = field(default_factory=dict)
    crop: list[int] = field(default_factory=lambda: [64, 64, 64])
    patch_size: int = 8


_CONFIGS: dict[str, type[HeadConfig]] = {
    "classify": ProbeConfig,
    "regress": ProbeConfig,
    "segment": SegmentConfig,
    "anomaly": AnomalyConfig,
    "ground": GroundConfig,
    "localize": LocalizeConfig,
}


def config_for_task(task: str, d: dict[str, Any] | HeadConfig) -> HeadConfig:
    """The config dataclass of ``task`` from a JSON dict (``task`` filled in).

    >>> config_for_task("segment", {"embed_dim": 64, "labels": ["background", "lesion"]}).channels
    16
    """
    if task not in _CONFIGS:
        raise ValueError(f"unknown head task {task!r}; tasks: {', '.join(TASKS)}")
    if isinstance(d, HeadConfig):
        return d
    d = dict(d)
    if d.get("task", task) != task:
        raise ValueError(f"config is for task {d['task']!r}, not {task!r}")
    d["task"] = task
    return _CONFIGS[task].from_dict(d)
