"""Writing a model bundle (layout in :mod:`decipher_mr.bundle.format`), all or nothing.

The bundle is assembled in a temporary folder next to the destination. A folder bundle is then
renamed into place; a zip is written to a temporary file and renamed onto ``model.zip``. An
interrupted export therefore leaves the old bundle (or nothing), never half of a new one.

Zip entries are sorted and carry a fixed timestamp, so the same files always zip to the same bytes
(and the same cache folder when loaded); only ``config.json``'s ``created`` time differs between
exports. Weights are stored uncompressed (float noise does not deflate and stored entries read
faster); text files are deflated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from decipher_mr.bundle import format as fmt
from decipher_mr.storage import sha256_file
from decipher_mr.bundle.format import BundleError
from decipher_mr.bundle.model_card import render_model_card
from decipher_mr.storage import atomic_path

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class HeadExport:
    """One trained head as it goes into a bundle.

    ``labels`` are the rows of ``labels.csv`` (dicts with the same keys, e.g. ``index`` and
    ``name``); ``metrics`` (optional) are shown in the model card.

    >>> HeadExport("tissue", "segmentation", {"classes": 4}, head, [{"index": 0, "name": "background"}])
    """

    name: str
    task: str
    config: dict[str, Any]
    module: nn.Module | Mapping[str, torch.Tensor]
    labels: Sequence[Mapping[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_head(cls, name: str, head: nn.Module, metrics: dict[str, Any] | None = None) -> "HeadExport":
        """Wrap a head built by :func:`decipher_mr.heads.build_head` (its config names the task and labels).

        >>> HeadExport.from_head("region", probe, metrics={"balanced_accuracy": 0.93})
        """
        cfg = getattr(head, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict") or not getattr(cfg, "task", ""):
            raise BundleError(f"head {name!r}: {type(head).__name__} has no head config (expected .config with a task)")
        rows = [{"index": i, "name": label} for i, label in enumerate(getattr(cfg, "labels", []) or [])]
        if cfg.task == "segment":  # coded concepts per label (DICOM-SEG, Slicer terminology): bundle/codes.py
            from .codes import with_codes

            rows = with_codes(rows)
        return cls(name, cfg.task, cfg.to_dict(), head, rows, dict(metrics or {}))


def _tensors(module: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = module.state_dict() if isinstance(module, nn.Module) else module
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _save_weights(tensors: dict[str, torch.Tensor], path: Path, kind: str) -> None:
    if not tensors:
        raise BundleError(f"{path.name}: the {kind} has no weights to export")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "decipher_mr": kind})


def labels_csv(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    """The text of a ``labels.csv`` (header from the first row's keys, in order)."""
    # grounding heads have no fixed labels (their queries are free text): header only
    columns = list(rows[0].keys()) if rows else ["index", "name"]
    for n, row in enumerate(rows):
        if list(row.keys()) != columns:
            raise BundleError(f"{where}: label row {n} has columns {list(row.keys())}, expected {columns}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _vision_record(vision: nn.Module) -> dict[str, Any]:
    cfg = getattr(vision, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise BundleError(f"{type(vision).__name__}: vision encoder has no JSON config (expected .config.to_dict())")
    d = cfg.to_dict()
    return {
        "architecture": "vit3d",
        "config": d,
        "patch_size": list(d.get("patch_size", [])),
        "position_grid": {
            "grid": list(d.get("pos_grid", [])),
            "resize": "trilinear",
            "align_corners": False,
            "padding": "zero-pad the high end of each axis to a multiple of the patch size",
        },
        "weights": fmt.VISION_WEIGHTS,
        "parameters": sum(p.numel() for p in vision.parameters()),
    }


def _preprocess_record(preprocess: Any) -> dict[str, Any]:
    from decipher_mr.data.preprocess import PreprocessConfig

    if isinstance(preprocess, PreprocessConfig):
        return preprocess.to_json()
    if isinstance(preprocess, Mapping):
        try:
            return PreprocessConfig.from_json(dict(preprocess)).to_json()
        except (TypeError, ValueError) as exc:
            raise BundleError(f"preprocessing settings are not a PreprocessConfig: {exc}") from exc
    raise BundleError("the bundle needs the preprocessing (a PreprocessConfig) its encoder was trained with")


def stage_bundle(
    folder: Path,
    *,
    preprocess: Any,
    model: nn.Module | None = None,
    vision: nn.Module | None = None,
    heads: Sequence[HeadExport] = (),
    name: str = "decipher-mr",
    training: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write every bundle file into the empty folder ``folder``; return ``config.json``'s content."""
    from decipher_mr import __version__

    if model is not None:
        if vision is not None and vision is not model.vision:
            raise BundleError("give either an aligned model or a vision encoder, not two different encoders")
        vision = model.vision
    if vision is None:
        raise BundleError("a bundle needs a vision encoder (or an aligned model holding one)")
    config: dict[str, Any] = {
        "format_version": fmt.FORMAT_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "decipher_mr_version": __version__,
        "vision": _vision_record(vision),
        "preprocess": _preprocess_record(preprocess),
        "orientation": fmt.ORIENTATION,
        "alignment": None,
        "text": None,
        "heads": {},
        "training": training or {},
    }
    _save_weights(_tensors(vision), folder / fmt.VISION_WEIGHTS, "vision encoder")
    if model is not None:
        from decipher_mr.models.clip import model_record

        record = model_record(model)
        proj = {k: v for k, v in _tensors(model).items() if not k.startswith(("vision.", "text."))}
        _save_weights(proj, folder / fmt.PROJECTION_WEIGHTS, "projections")
        model.text.save_pretrained(folder / fmt.TEXT_FOLDER)
        config["alignment"] = {
            "embed_dim": int(model.embed_dim),
            "image_pooling": record.get("image_pooling"),
            "image_view": record.get("image_view"),
            "logit_scale_max": record.get("logit_scale_max"),
            "weights": fmt.PROJECTION_WEIGHTS,
        }
        config["text"] = {
            "folder": fmt.TEXT_FOLDER,
            "tokenizer": fmt.TEXT_FOLDER,
            "pooling": model.text.pooling,
            "max_length": int(model.text.max_length),
            "hidden_size": int(model.text.hidden_size),
            "source": "/".join(Path(model.text.source).parts[-2:]) if model.text.source else None,
            "parameters": sum(p.numel() for p in model.text.parameters()),
        }
    for head in heads:
        fmt.check_head_name(head.name, "export")
        if head.name in config["heads"]:
            raise BundleError(f"export: two heads are named {head.name!r}")
        width = head.config.get("embed_dim") if isinstance(head.config, Mapping) else None
        if isinstance(width, int) and width != config["vision"]["config"].get("embed_dim"):
            raise BundleError(f"head {head.name}: made for a {width}-d encoder, but the bundle's encoder is "
                              f"{config['vision']['config'].get('embed_dim')}-d; export the encoder it was trained on")
        base = fmt.head_folder(head.name)
        _save_weights(_tensors(head.module), folder / base / fmt.HEAD_WEIGHTS, f"head {head.name}")
        (folder / base / fmt.HEAD_LABELS).write_text(labels_csv(head.labels, f"head {head.name}"), encoding="utf-8")
        try:
            head_config = json.loads(json.dumps(head.config))
        except TypeError as exc:
            raise BundleError(f"head {head.name}: its config is not JSON-serialisable ({exc})") from exc
        config["heads"][head.name] = {
            "task": head.task,
            "config": head_config,
            "weights": f"{base}/{fmt.HEAD_WEIGHTS}",
            "labels": f"{base}/{fmt.HEAD_LABELS}",
            "classes": len(head.labels),
            "metrics": head.metrics,
        }
    fmt.validate_config(config)
    (folder / fmt.CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / fmt.MODEL_CARD).write_text(render_model_card(config), encoding="utf-8")
    write_manifest(folder, progress)
    return config


def _progress(files: list[Path], desc: str, enabled: bool):
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in files)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False, file=sys.stderr)


def write_manifest(folder: Path, progress: bool = False) -> dict[str, Any]:
    """(Re)write ``manifest.json`` listing the sha256 and size of every other file in ``folder``.

    >>> write_manifest(Path("bundle"))["files"]["config.json"]["sha256"]
    """
    files = {}
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != fmt.MANIFEST)
    with _progress(paths, "checksums", progress) as bar:
        for path in paths:
            size = path.stat().st_size
            files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": size}
            bar.update(size)
    manifest = {"format_version": fmt.FORMAT_VERSION, "files": files}
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def zip_folder(folder: Path, dest: Path, progress: bool = False) -> None:
    """Write ``folder``'s files into the zip ``dest`` (sorted, fixed timestamps, plain file modes)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    with zipfile.ZipFile(dest, "w") as zf, _progress(paths, "zip", progress) as bar:
        for path in paths:
            rel = path.relative_to(folder).as_posix()
            info = zipfile.ZipInfo(rel, date_time=ZIP_EPOCH)
            info.external_attr = (0o100644 & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_STORED if rel.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            bar.update(path.stat().st_size)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def write_bundle(
    out: str | os.PathLike,
    *,
    preprocess: Any,
    model: nn.Module | None = None,
    vision: nn.Module | None = None,
    heads: Sequence[HeadExport] = (),
    name: str = "decipher-mr",
    training: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Export a bundle to ``out`` (a ``.zip`` file or a folder), atomically.

    ``model`` is an aligned :class:`~decipher_mr.models.clip.ImageTextModel` (encoder, text tower,
    projections); without one, pass ``vision`` for an image-only bundle.

    >>> write_bundle("model.zip", model=aligned, heads=[tissue_head], preprocess=PreprocessConfig())
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(preprocess=preprocess, model=model, vision=vision, heads=heads, name=name, training=training,
                  progress=progress)
    if out.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            staged = Path(tmp) / "bundle"
            staged.mkdir()
            stage_bundle(staged, **kwargs)
            with atomic_path(out, suffix=".zip") as tmp_zip:
                zip_folder(staged, tmp_zip, progress)
        return out
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / fmt.MANIFEST).exists())):
        raise BundleError(f"{out}: exists and is not a bundle folder; refusing to replace it")
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.with_name(f".{out.name}.old")
    try:
        stage_bundle(staged, **kwargs)
        _fsync_tree(staged)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
