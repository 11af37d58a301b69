"""Loading and verifying model bundles: trust the whole bundle or refuse it, saying why.

Before any weight is read, a bundle (folder, or zip extracted by :mod:`decipher_mr.bundle.archive`)
must pass, in this order: no symbolic links and no pickle-format files anywhere; a readable
``manifest.json`` and ``config.json`` whose format versions this code reads; every file listed in the
manifest present with its sha256 and size; no file that the manifest does not list; a
``config.json`` that fits the schema; and every ``.safetensors`` file with a real safetensors
header. Only then are the modules built and their weights loaded (strictly: every tensor must fit).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from decipher_mr.bundle import format as fmt
from decipher_mr.bundle.archive import extract_bundle_zip
from decipher_mr.storage import sha256_file
from decipher_mr.bundle.format import BundleError


@dataclass
class Bundle:
    """A loaded, verified bundle.

    ``model`` is the aligned image-text model (``None`` for an image-only bundle); ``vision`` is
    its encoder; ``heads`` holds the requested heads (eval mode), ``labels`` their label tables;
    ``tokenizer_dir`` is the folder to load the tokenizer from.

    >>> b = load_bundle("model.zip", heads=["tissue"])
    >>> b.model.encode_image(x), b.heads["tissue"], b.labels["tissue"][0]["name"]
    """

    source: Path
    folder: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    preprocess: Any
    vision: nn.Module
    model: nn.Module | None = None
    tokenizer_dir: Path | None = None
    heads: dict[str, nn.Module] = field(default_factory=dict)
    head_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def format_version(self) -> int:
        return int(self.config["format_version"])

    @property
    def available_heads(self) -> list[str]:
        return sorted(self.config["heads"])


def _display(source: Path, is_zip: bool, rel: str) -> str:
    # name files the way the user knows them: inside the zip they passed, not the cache folder
    return f"{source}:{rel}" if is_zip else str(source / rel)


def _read_json(path: Path, shown: str) -> Any:
    if not path.is_file():
        raise BundleError(f"{shown}: missing; this is not a complete model bundle")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{shown}: damaged JSON ({exc})") from exc


def _walk(folder: Path, shown) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for entry in (*dirnames, *filenames):
            p = base / entry
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                raise BundleError(f"{shown(rel)}: is a symbolic link; bundles may hold plain files only")
            if entry in filenames:
                if not p.is_file():
                    raise BundleError(f"{shown(rel)}: is not a plain file")
                files.append(rel)
    return sorted(files)


def check_bundle_folder(folder: Path, source: Path | None = None, is_zip: bool = False) -> tuple[dict, dict]:
    """Verify an unpacked bundle (module doc); return ``(config, manifest)``.

    >>> config, manifest = check_bundle_folder(Path("model"))
    """
    source = source or folder

    def shown(rel: str) -> str:
        return _display(source, is_zip, rel)

    if not folder.is_dir():
        raise BundleError(f"{source}: bundle not found (expected a bundle folder or a .zip)")
    files = _walk(folder, shown)
    for rel in files:
        if rel.lower().endswith(fmt.PICKLE_SUFFIXES):
            raise BundleError(f"{shown(rel)}: pickle-format weights are refused (they can run code when "
                              "loaded); bundles hold safetensors only")
    manifest = _read_json(folder / fmt.MANIFEST, shown(fmt.MANIFEST))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{shown(fmt.MANIFEST)}: not a bundle manifest (no 'files' table)")
    fmt.check_format_version(manifest.get("format_version"), shown(fmt.MANIFEST))
    config = _read_json(folder / fmt.CONFIG, shown(fmt.CONFIG))
    if isinstance(config, dict):
        fmt.check_format_version(config.get("format_version"), shown(fmt.CONFIG))
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in sorted(listed.items()):
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel == fmt.MANIFEST:
            raise BundleError(f"{shown(fmt.MANIFEST)}: lists {rel!r}, which is not a file inside the bundle")
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"{shown(rel)}: listed in the manifest but missing from the bundle")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{shown(fmt.MANIFEST)}: entry for {rel!r} has no sha256")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise BundleError(f"{shown(rel)}: checksum mismatch (size {path.stat().st_size} bytes, the manifest "
                              f"says {entry['bytes']}); the bundle is corrupt or was modified")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{shown(rel)}: checksum mismatch (sha256 differs from the manifest); "
                              "the bundle is corrupt or was modified")
    extra = [rel for rel in files if rel != fmt.MANIFEST and rel not in listed]
    if extra:
        raise BundleError(f"{shown(extra[0])}: not listed in the manifest; refusing a bundle with unlisted files"
                          + (f" ({len(extra)} in all)" if len(extra) > 1 else ""))
    fmt.validate_config(config, shown(fmt.CONFIG))
    for rel in files:
        if rel.endswith(".safetensors"):
            fmt.check_safetensors_header(folder / rel, shown(rel))
    needed = [config["vision"]["weights"]]
    if config.get("alignment"):
        needed.append(config["alignment"]["weights"])
        text_folder = config["text"]["folder"]
        if not any(rel.startswith(text_folder + "/") for rel in listed):
            raise BundleError(f"{shown(fmt.CONFIG)}: names text folder {text_folder!r}, which the bundle lacks")
    for spec in config["heads"].values():
        needed += [spec["weights"], spec["labels"]]
    for rel in needed:
        if rel not in listed:
            raise BundleError(f"{shown(fmt.CONFIG)}: names {rel!r}, which is not in the bundle")
    return config, manifest


def _bundle_root(extracted: Path) -> Path:
    # a user who zips the bundle folder itself (zip -r model.zip model/) gets one top-level folder
    entries = list(extracted.iterdir())
    if not (extracted / fmt.MANIFEST).exists() and len(entries) == 1 and (entries[0] / fmt.MANIFEST).is_file():
        return entries[0]
    return extracted


def open_bundle_folder(path: str | os.PathLike) -> tuple[Path, Path, bool, dict, dict]:
    """Resolve ``path`` (folder or zip) to a verified folder: ``(source, folder, is_zip, config, manifest)``."""
    source = Path(path)
    if source.is_file():
        extracted = extract_bundle_zip(source)
        try:
            return (source, _bundle_root(extracted), True, *check_bundle_folder(_bundle_root(extracted), source, True))
        except BundleError:
            # a cached extraction that was damaged after the fact: extract afresh once, check again
            shutil.rmtree(extracted, ignore_errors=True)
            extracted = extract_bundle_zip(source)
            return (source, _bundle_root(extracted), True, *check_bundle_folder(_bundle_root(extracted), source, True))
    return (source, source, False, *check_bundle_folder(source, source, False))


def _load_weights(module: nn.Module, path: Path, shown: str, strict_prefixes: Sequence[str] = ()) -> None:
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BundleError(f"{shown}: cannot read the weights ({exc})") from exc
    if strict_prefixes:
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(tuple(strict_prefixes))]
        if missing or unexpected:
            raise BundleError(f"{shown}: weights do not fit the model in config.json "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        return
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{shown}: weights do not fit the model in config.json ({exc})") from exc


def read_labels(path: Path, shown: str) -> list[dict[str, Any]]:
    """Rows of a head's ``labels.csv``; an ``index`` column is read as integers."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [dict(r) for r in csv.DictReader(fh)]
    if rows and "index" in rows[0]:
        try:
            for r in rows:
                r["index"] = int(r["index"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{shown}: the 'index' column must hold integers ({exc})") from exc
    return rows


def _build_head(name: str, spec: dict[str, Any], shown: str) -> nn.Module:
    try:
        from decipher_mr.heads import build_head
    except ImportError as exc:
        raise BundleError(f"{shown}: head {name!r} needs decipher_mr.heads, which this installation lacks") from exc
    try:
        return build_head(spec["task"], spec["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"{shown}: head {name!r} ({spec['task']}) cannot be built from its config: {exc}") from exc


def load_bundle(path: str | os.PathLike, heads: Sequence[str] | None = None) -> Bundle:
    """Verify and load a bundle (folder or zip); ``heads=None`` loads every head, ``[]`` none.

    Raises :class:`~decipher_mr.bundle.format.BundleError` naming the file and the reason when
    anything cannot be trusted or understood, or when a requested head is not in the bundle.

    >>> bundle = load_bundle("model.zip", heads=["tissue"])
    """
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.models.vit3d import build_vision_encoder

    source, folder, is_zip, config, manifest = open_bundle_folder(path)

    def shown(rel: str) -> str:
        return _display(source, is_zip, rel)

    wanted = sorted(config["heads"]) if heads is None else list(heads)
    absent = [h for h in wanted if h not in config["heads"]]
    if absent:
        have = ", ".join(sorted(config["heads"])) or "no heads"
        raise BundleError(f"{shown(fmt.CONFIG)}: the bundle has no head {absent[0]!r} (it holds: {have})")
    try:
        preprocess = PreprocessConfig.from_json(config["preprocess"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{shown(fmt.CONFIG)}: preprocessing settings not understood ({exc})") from exc
    # building modules draws random initial weights that are overwritten at once; keep the
    # caller's random stream as it was
    with torch.random.fork_rng(devices=[]):
        try:
            vision = build_vision_encoder(dict(config["vision"]["config"]))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{shown(fmt.CONFIG)}: vision encoder config not understood ({exc})") from exc
        _load_weights(vision, folder / config["vision"]["weights"], shown(config["vision"]["weights"]))
        bundle = Bundle(source=source, folder=folder, config=config, manifest=manifest, preprocess=preprocess,
                        vision=vision.eval())
        if config.get("alignment"):
            bundle.model, bundle.tokenizer_dir = _load_aligned(folder, config, vision, shown)
        for name in wanted:
            spec = config["heads"][name]
            head = _build_head(name, spec, shown(fmt.CONFIG))
            _load_weights(head, folder / spec["weights"], shown(spec["weights"]))
            bundle.heads[name] = head.eval()
            bundle.head_specs[name] = {"task": spec["task"], "config": spec["config"]}
            labels = read_labels(folder / spec["labels"], shown(spec["labels"]))
            named = spec["config"].get("labels")
            if isinstance(named, list) and labels and "name" in labels[0] and [r["name"] for r in labels] != named:
                raise BundleError(f"{shown(spec['labels'])}: label names differ from head {name!r}'s config")
            if spec["task"] == "segment":  # codes, where the table has them, must parse (bundle/codes.py)
                from .codes import CodeError, label_codes

                try:
                    label_codes(labels, shown(spec["labels"]))
                except CodeError as exc:
                    raise BundleError(str(exc)) from exc
            bundle.labels[name] = labels
    return bundle


def _load_aligned(folder: Path, config: dict[str, Any], vision: nn.Module, shown) -> tuple[nn.Module, Path]:
    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower, TextTowerError, load_text_backbone

    text_cfg, align = config["text"], config["alignment"]
    text_dir = folder / text_cfg["folder"]
    try:
        backbone, tokenizer, _ = load_text_backbone(text_dir)
    except TextTowerError as exc:
        raise BundleError(f"{shown(text_cfg['folder'])}: text tower cannot be loaded ({exc})") from exc
    text = TextTower(backbone, tokenizer, pooling=text_cfg["pooling"], max_length=text_cfg["max_length"],
                     source=text_cfg.get("source"))
    model = ImageTextModel(vision, text, embed_dim=int(align["embed_dim"]))
    model.image_view = align.get("image_view")
    _load_weights(model, folder / align["weights"], shown(align["weights"]),
                  strict_prefixes=("image_proj", "text_proj", "logit_scale"))
    return model.eval(), text_dir


def verify_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Fully check a bundle (checksums, format, schema, and that every weight loads into its module)
    and return a summary of what it holds.

    >>> verify_bundle("model.zip")["heads"]
    {'tissue': {'task': 'segmentation', 'classes': 4}}
    """
    bundle = load_bundle(path, heads=None)
    files = bundle.manifest["files"]
    vcfg = bundle.config["vision"]["config"]
    summary: dict[str, Any] = {
        "path": str(bundle.source),
        "format_version": bundle.format_version,
        "name": bundle.config.get("name"),
        "created": bundle.config.get("created"),
        "files": len(files),
        "bytes": sum(int(e.get("bytes", 0)) for e in files.values()),
        "encoder": {
            "name": vcfg.get("name"),
            "embed_dim": vcfg.get("embed_dim"),
            "depth": vcfg.get("depth"),
            "patch_size": vcfg.get("patch_size"),
            "parameters": sum(p.numel() for p in bundle.vision.parameters()),
        },
        "text": None,
        "embed_dim": None,
        "heads": {n: {"task": s["task"], "classes": len(bundle.labels[n])} for n, s in bundle.head_specs.items()},
        "preprocess": bundle.config["preprocess"],
    }
    if bundle.model is not None:
        summary["embed_dim"] = bundle.config["alignment"]["embed_dim"]
        summary["text"] = {
            "source": bundle.config["text"].get("source"),
            "hidden_size": bundle.model.text.hidden_size,
            "parameters": sum(p.numel() for p in bundle.model.text.parameters()),
        }
    return summary


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for a :func:`verify_bundle` summary (what ``decipher-mr verify`` prints).

    >>> print(describe_summary(verify_bundle("model.zip")))
    """
    enc = summary["encoder"]
    pre = summary["preprocess"]
    lines = [
        f"bundle      {summary['path']}",
        f"name        {summary.get('name')}  (created {summary.get('created')})",
        f"format      version {summary['format_version']}",
        f"files       {summary['files']} files, {_size(summary['bytes'])}, all sha256 checksums match",
        f"encoder     3D ViT {enc['name']}: {enc['embed_dim']}-d, {enc['depth']} layers, patches "
        f"{'x'.join(str(p) for p in enc['patch_size'])}, {enc['parameters'] / 1e6:.2f} M parameters",
    ]
    if summary.get("text"):
        t = summary["text"]
        lines.append(f"text        {t['hidden_size']}-d BERT-family tower from {t['source']}, "
                     f"{t['parameters'] / 1e6:.2f} M parameters; shared space {summary['embed_dim']}-d")
    else:
        lines.append("text        none (image-only bundle)")
    lines.append(f"input       RAS+, spacing {pre.get('target_spacing') or 'native'} mm, intensity "
                 f"{pre.get('scale')} after clipping to percentiles {pre.get('clip_percentiles')}")
    heads = summary["heads"]
    if heads:
        for n, (name, spec) in enumerate(sorted(heads.items())):
            lines.append(f"{'heads' if n == 0 else '':<12}{name}: {spec['task']}, {spec['classes']} labels")
    else:
        lines.append("heads       none")
    return "\n".join(lines)
