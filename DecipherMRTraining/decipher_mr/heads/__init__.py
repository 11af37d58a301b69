"""Light task heads on the (frozen) 3D ViT, and the one interface a model bundle stores them through.

A head is four things, and nothing else (the bundle exporter writes exactly these):

* ``task`` — one of :data:`TASKS` (``classify``, ``regress``, ``segment``, ``anomaly``, ``ground``,
  ``localize``);
* ``config`` — a JSON-serialisable dataclass (:class:`ProbeConfig`, :class:`SegmentConfig`,
  :class:`AnomalyConfig`, :class:`GroundConfig`, :class:`LocalizeConfig`) that rebuilds the module;
* ``state`` — the module's ``state_dict`` as safetensors (buffers such as the regression target
  statistics or the normal-token model are part of it);
* ``labels.csv`` — ``index,name`` rows: class names, regression targets, segment classes or
  structure names (empty for grounding, whose "labels" are free text).

Every head is called the same way, after one encoder pass::

    out = encoder(image, return_layers=head.required_layers)      # EncoderOutput
    y = head(out, image=image, text=text_embedding)                # what y is depends on the task

What ``y`` is: classify -> logits (B, K); regress -> values (B, K) in the target's units; segment ->
logits (B, K, X, Y, Z); anomaly -> use ``head.anomaly_map(out, image)`` for the [0, 1] map (forward
gives logits for the supervised head, the map for the unsupervised one); ground -> logits
(B, 1, X, Y, Z), ``head.ground(out, image, text)`` adds mask, box and peak; localize -> logits
(B, K, X, Y, Z), ``head.locate(out, image)`` gives a box and peak per structure. Dense heads
handle volumes larger than ``config.crop`` with :func:`decipher_mr.heads.dense.predict_volume`
(sliding windows); ``head.required_layers`` says which encoder blocks to return.

:func:`save_head` / :func:`load_head` write and read the four pieces (atomic, checksummed via the
folder manifest); :func:`build_head` makes a fresh head from ``(task, config)``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Union

from torch import nn

from .configs import (
    TASKS,
    AnomalyConfig,
    GroundConfig,
    HeadConfig,
    LocalizeConfig,
    ProbeConfig,
    SegmentConfig,
    config_for_task,
)

HEAD_FORMAT = 1

__all__ = [
    "TASKS", "HeadConfig", "ProbeConfig", "SegmentConfig", "AnomalyConfig", "GroundConfig",
    "LocalizeConfig", "config_for_task", "build_head", "save_head", "load_head", "HeadError", "HEAD_FORMAT",
]


class HeadError(RuntimeError):
    """A saved head that cannot be used; the message names the file and the reason."""


def build_head(task: str, config: Union[HeadConfig, dict[str, Any]]) -> nn.Module:
    """A freshly initialised head for ``task`` from its config (dataclass or JSON dict).

    >>> head = build_head("classify", {"embed_dim": 64, "labels": ["brain", "knee"]})
    """
    cfg = config if isinstance(config, HeadConfig) else config_for_task(task, config)
    if task in ("classify", "regress"):
        from .probes import build_probe

        return build_probe(task, cfg)  # type: ignore[arg-type]
    if task == "segment":
        from .segmentation import SegmentationHead

        return SegmentationHead(cfg)  # type: ignore[arg-type]
    if task == "anomaly":
        from .anomaly import build_anomaly_head

        return build_anomaly_head(cfg)  # type: ignore[arg-type]
    if task == "ground":
        from .grounding import GroundingHead

        return GroundingHead(cfg)  # type: ignore[arg-type]
    if task == "localize":
        from .localization import LocalizationHead

        return LocalizationHead(cfg)  # type: ignore[arg-type]
    raise ValueError(f"unknown head task {task!r}; tasks: {', '.join(TASKS)}")


def labels_csv(labels: list[str]) -> str:
    """The ``labels.csv`` text for a label list (``index,name`` with a header row)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "name"])
    for i, name in enumerate(labels):
        w.writerow([i, name])
    return buf.getvalue()


def read_labels_csv(path: Path) -> list[str]:
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    if not rows or rows[0] != ["index", "name"]:
        raise HeadError(f"{path}: expected a header 'index,name'")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].isdigit() or int(row[0]) != len(out):
            raise HeadError(f"{path}:{n}: expected 'index,name' with consecutive indices, got {row}")
        out.append(row[1])
    return out


def save_head(head: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/{head.json, head.safetensors, labels.csv, manifest.json}`` atomically.

    ``head.json`` is ``{"format", "task", "config", **extra}``; ``manifest.json`` holds the sha256 of
    the other three so :func:`load_head` can refuse a damaged copy.

    >>> save_head(head, "runs/heads/classify/head")
    """
    from safetensors.torch import save_file

    from decipher_mr.storage import atomic_folder, sha256_file

    dest = Path(folder)
    cfg: HeadConfig = head.config  # type: ignore[assignment]
    with atomic_folder(dest) as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
        save_file(state, str(tmp / "head.safetensors"))
        record = {"format": HEAD_FORMAT, "task": cfg.task, "config": cfg.to_dict(), **(extra or {})}
        (tmp / "head.json").write_text(json.dumps(record, indent=2))
        (tmp / "labels.csv").write_text(labels_csv(list(cfg.labels)), encoding="utf-8")
        files = ["head.json", "head.safetensors", "labels.csv"]
        (tmp / "manifest.json").write_text(json.dumps({"format": HEAD_FORMAT, "sha256": {f: sha256_file(tmp / f) for f in files}}, indent=2))
    return dest


def load_head(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Verify and load a head written by :func:`save_head`; returns ``(head, head.json record)``.

    >>> head, record = load_head("runs/heads/classify/head"); record["task"]
    'classify'
    """
    from safetensors.torch import load_file

    from decipher_mr.storage import sha256_file

    folder = Path(folder)
    if (folder / "head" / "head.json").exists():
        folder = folder / "head"
    mpath = folder / "manifest.json"
    if not (folder / "head.json").exists() or not mpath.exists():
        raise HeadError(f"{folder}: not a saved head (needs head.json and manifest.json); run `decipher-mr train-head`")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    for name, digest in manifest.get("sha256", {}).items():
        if not (folder / name).exists():
            raise HeadError(f"{folder / name}: missing from the saved head")
        if sha256_file(folder / name) != digest:
            raise HeadError(f"{folder / name}: checksum mismatch, the head is damaged")
    record = json.loads((folder / "head.json").read_text(encoding="utf-8"))
    if record.get("format", 0) > HEAD_FORMAT:
        raise HeadError(f"{folder / 'head.json'}: head format {record['format']} is newer than this version reads")
    cfg = config_for_task(record["task"], record["config"])
    labels = read_labels_csv(folder / "labels.csv")
    if labels != list(cfg.labels):
        raise HeadError(f"{folder / 'labels.csv'}: labels differ from head.json's config")
    head = build_head(record["task"], cfg)
    try:
        head.load_state_dict(load_file(str(folder / "head.safetensors")), strict=True)
    except RuntimeError as exc:
        raise HeadError(f"{folder / 'head.safetensors'}: weights do not fit the config ({exc})") from exc
    head.eval()
    return head, record


def head_config_dict(head: nn.Module) -> dict[str, Any]:
    return dataclasses.asdict(head.config)  # type: ignore[arg-type]
