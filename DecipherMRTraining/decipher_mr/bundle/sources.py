"""Gathering a bundle's parts from training outputs (what ``decipher-mr export`` packs).

* ``--vision``: a stage-1 export or run folder (``load_vision_encoder``), or a preset name for an
  untrained smoke-test bundle;
* ``--align``: a stage-2 run folder or its ``model/`` export (:func:`load_image_text_model`);
* ``--head NAME=RUN``: a head folder written by :func:`decipher_mr.heads.save_head` (or its run);
* ``--preprocess``: a prepared cache folder, its ``cache.json``, or a PreprocessConfig JSON. Without
  it the preprocessing is read from the runs' recorded configs (the ``cache`` they trained on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from decipher_mr.bundle.format import BundleError


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as JSON ({exc})") from exc


def read_preprocess(path: str | Path) -> dict[str, Any]:
    """The PreprocessConfig (as JSON) from a cache folder, a ``cache.json`` or a plain config JSON.

    >>> read_preprocess("demo/cache")["target_spacing"]
    [1.5, 1.5, 1.5]
    """
    from decipher_mr.data.preprocess import PreprocessConfig

    p = Path(path)
    if p.is_dir():
        p = p / "cache.json"
    if not p.is_file():
        raise BundleError(f"{p}: not found (give a prepared cache folder or a preprocessing JSON)")
    obj = _json(p)
    if isinstance(obj, dict) and isinstance(obj.get("preprocess"), dict):
        obj = obj["preprocess"]
    try:
        return PreprocessConfig.from_json(obj).to_json()
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{p}: not preprocessing settings ({exc})") from exc


def _recorded_caches(run: Path) -> Iterable[str]:
    """Cache folders named in a run's recorded configs (newest checkpoint first)."""
    from decipher_mr.train.checkpoint import latest_checkpoint

    for root in (run, run / "head", run.parent):
        ckpt = latest_checkpoint(root / "checkpoints")
        if ckpt is not None and (ckpt / "trainer_state.json").is_file():
            state = _json(ckpt / "trainer_state.json")
            cache = (state.get("stage") or {}).get("config", {}).get("cache")
            if cache:
                yield cache
        for name in ("config.json", "run_config.json", "head.json"):
            if (root / name).is_file():
                obj = _json(root / name)
                if isinstance(obj, dict):
                    for holder in (obj, obj.get("training") or {}, obj.get("config") or {}):
                        if isinstance(holder, dict) and isinstance(holder.get("cache"), str):
                            yield holder["cache"]


def find_training_cache(runs: Iterable[str | Path | None]) -> Path:
    """The prepared cache recorded by the first run that names a readable one; refuse if none does."""
    tried = []
    for run in runs:
        if run is None:
            continue
        run = Path(run)
        tried.append(str(run))
        for cache in _recorded_caches(run):
            if (Path(cache) / "cache.json").is_file():
                return Path(cache)
    raise BundleError(
        "cannot tell which preprocessing the model was trained with "
        f"(no readable cache recorded in {', '.join(tried) or 'the given runs'}); pass --preprocess CACHE"
    )


def find_preprocess(runs: Iterable[str | Path | None]) -> dict[str, Any]:
    """Preprocessing recorded by the first run that names its cache; refuse if none does.

    >>> find_preprocess(["runs/align"])["target_spacing"]
    """
    return read_preprocess(find_training_cache(runs))


def describe_cache(cache: str | Path) -> str | None:
    """One line for the model card about the data in a prepared cache (counts only, never report text).

    >>> describe_cache("demo/cache")
    '48 prepared series (brain 24, knee 8, ...), 48 with a report; 48 generated ...'
    """
    from collections import Counter

    from decipher_mr.data.cache import PreparedCache

    try:
        items = PreparedCache(cache).items
    except Exception:  # a cache that moved or changed since training: the card just says less
        return None
    regions = Counter(i.body_region or "unknown" for i in items)
    splits = Counter(i.split or "unsplit" for i in items)
    generated = sum(1 for i in items if i.extra.get("generated"))
    line = (f"{len(items)} prepared series ({', '.join(f'{k} {v}' for k, v in sorted(regions.items()))}; "
            f"splits {', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}), "
            f"{sum(1 for i in items if i.report)} with a report")
    if generated:
        line += (f"; {generated} of them generated (the offline demo corpus: real template anatomy with "
                 "augmentation, synthetic lesions and generated reports, not clinical data)")
    return line


def load_vision(spec: str | Path) -> nn.Module:
    """A stage-1 encoder from an export/run folder, or a fresh preset (``vit-micro``) for smoke tests."""
    from decipher_mr.models.clip import AlignedModelError, build_vision_from_spec
    from decipher_mr.train.ssl.export import teacher_backbone_from_run

    try:
        return build_vision_from_spec(str(spec), run_loader=teacher_backbone_from_run).eval()
    except AlignedModelError as exc:
        raise BundleError(str(exc)) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{spec}: cannot load the vision encoder ({exc})") from exc


def load_aligned(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The aligned model of a stage-2 run and its training record."""
    from decipher_mr.models.clip import AlignedModelError, load_image_text_model

    folder = Path(run)
    try:
        model = load_image_text_model(folder)
    except AlignedModelError as exc:
        raise BundleError(str(exc)) from exc
    cfg_path = folder / "model" / "config.json" if (folder / "model" / "config.json").is_file() else folder / "config.json"
    record = _json(cfg_path).get("training", {}) if cfg_path.is_file() else {}
    return model, record if isinstance(record, dict) else {}


def load_head_run(spec: str) -> tuple[str, nn.Module, dict[str, Any], dict[str, Any], Path]:
    """``NAME=RUN`` -> ``(name, head, metrics, head.json record, head folder)`` for a head saved by
    :func:`decipher_mr.heads.save_head` (``RUN`` or ``RUN/head``).

    >>> name, head, metrics, record, folder = load_head_run("tissue=runs/heads/tissue")
    """
    from decipher_mr.heads import HeadError, load_head

    if "=" not in spec:
        raise BundleError(f"--head {spec!r}: expected NAME=RUN (e.g. tissue=runs/heads/tissue)")
    name, path = spec.split("=", 1)
    folder = Path(path) / "head" if (Path(path) / "head" / "head.json").is_file() else Path(path)
    try:
        head, record = load_head(folder)
    except (HeadError, OSError, ValueError, KeyError) as exc:
        raise BundleError(f"--head {name}: {exc}") from exc
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
        # train-head writes the last validation into RUN/history.json ("final")
        for cand in (folder / "metrics.json", folder.parent / "metrics.json", folder.parent / "history.json"):
            if cand.is_file() and isinstance(obj := _json(cand), dict):
                obj = obj.get("final", obj) if cand.name == "history.json" else obj
                if isinstance(obj, dict):
                    metrics = {k: v for k, v in obj.items() if isinstance(v, (int, float, str))}
                break
    return name, head, metrics, record, folder


def check_head_encoder(name: str, record: dict[str, Any], folder: Path, vision: nn.Module) -> None:
    """Refuse a head whose recorded encoder is not the bundle's: another architecture, or an encoder
    fine-tuned with the head (``unfreeze_last``) whose weights differ from the bundle's."""
    from safetensors.torch import load_file

    from decipher_mr.models.vit3d import VisionEncoderConfig

    enc = record.get("encoder")
    if not isinstance(enc, dict):
        return
    if isinstance(enc.get("config"), dict):
        try:
            theirs = VisionEncoderConfig.from_dict(enc["config"]).architecture()
        except (TypeError, ValueError):
            theirs = None
        ours = vision.config.architecture()
        if theirs is not None and theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise BundleError(f"{folder / 'head.json'}: head {name!r} was trained on another encoder "
                              f"architecture (differs in {', '.join(diff)}); export the encoder it was trained on")
    if enc.get("weights"):
        tuned = folder.parent / enc["weights"]
        if not tuned.is_file():
            raise BundleError(f"{tuned}: head {name!r} was trained with this fine-tuned encoder, which is missing")
        state = load_file(str(tuned))
        mine = vision.state_dict()
        if state.keys() != mine.keys() or any(not torch.equal(state[k], mine[k]) for k in state):
            raise BundleError(f"{tuned}: head {name!r} was trained with a fine-tuned encoder that differs from the "
                              "bundle's; bundle that encoder (--vision) or a head trained on the frozen encoder")


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold identical tensors under identical names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
