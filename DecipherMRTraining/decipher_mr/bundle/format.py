"""The model bundle format: its layout, its version and the schema of its ``config.json``.

A bundle is one folder, or a zip of that folder, that holds everything inference needs::

    config.json                    what the files are and how to use them (schema below)
    manifest.json                  {"format_version": 1, "files": {relpath: {"sha256", "bytes"}}}
                                   -- every other file, and nothing else, is listed here
    MODEL_CARD.md                  training data, metrics, intended use (research, not clinical)
    vision/encoder.safetensors     the 3D ViT
    text/                          the text tower as a Hugging Face folder (config.json,
                                   model.safetensors, tokenizer files)              [aligned only]
    projections.safetensors        image_proj.weight, text_proj.weight, logit_scale [aligned only]
    heads/<name>/head.safetensors  one trained head's weights
    heads/<name>/labels.csv        its label table

``config.json``::

    format_version   int, the bundle format (readers refuse a newer one)
    name, created, decipher_mr_version
    vision           {"architecture": "vit3d", "config": VisionEncoderConfig, "patch_size",
                      "position_grid": {"grid", "resize", "align_corners", "padding"}, "weights"}
    preprocess       the PreprocessConfig (spacing, intensity clipping and scaling, cropping)
    orientation      "RAS" -- prepared arrays and model inputs are RAS+ voxel axes
    alignment        null, or {"embed_dim", "image_pooling", "image_view", "weights", "logit_scale_max"}
                     (image_view: the view the image embedding embeds, decipher_mr.data.views; null = pooled tokens)
    text             null, or {"folder": "text", "tokenizer": "text", "pooling", "max_length",
                      "hidden_size", "source"}
    heads            {name: {"task", "config", "weights", "labels"}}

Weights are safetensors only: nothing in a bundle is ever unpickled. Readers check the manifest
first, so a bundle is trusted as a whole or not at all.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

CONFIG = "config.json"
MANIFEST = "manifest.json"
MODEL_CARD = "MODEL_CARD.md"
VISION_WEIGHTS = "vision/encoder.safetensors"
TEXT_FOLDER = "text"
PROJECTION_WEIGHTS = "projections.safetensors"
HEADS_FOLDER = "heads"
HEAD_WEIGHTS = "head.safetensors"
HEAD_LABELS = "labels.csv"
ORIENTATION = "RAS"

# Extensions of serialisations that can run code when loaded (pickle and friends); a bundle that
# holds one is refused outright, whatever the manifest says.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npz", ".h5", ".msgpack")
# A head name becomes a folder name: keep it to a plain, portable path component.
HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# safetensors headers are small JSON; a claimed header larger than this is not one.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class BundleError(RuntimeError):
    """A bundle that cannot be written, trusted or understood; the message names the file and why."""


def head_folder(name: str) -> str:
    return f"{HEADS_FOLDER}/{name}"


def check_head_name(name: str, where: str = "head") -> str:
    """Refuse head names that are not one plain path component (they become ``heads/<name>/``).

    >>> check_head_name("tissue-seg")
    'tissue-seg'
    """
    if not isinstance(name, str) or not HEAD_NAME.match(name) or name in (".", ".."):
        raise BundleError(
            f"{where}: head name {name!r} must be 1-64 letters, digits, '_', '-' or '.' (starting with a letter or digit)"
        )
    return name


def check_safetensors_header(path: Path, display: str | None = None) -> dict[str, Any]:
    """Parse and return the JSON header of a safetensors file; refuse anything that is not one.

    Only the header is read: a pickle (``torch.save``) or any other format fails here before a
    single tensor is touched.

    >>> check_safetensors_header(Path("bundle/vision/encoder.safetensors"))["__metadata__"]
    """
    name = display or str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BundleError(f"{name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise BundleError(f"{name}: not a safetensors file (its header is not safetensors; "
                              "pickled weights such as torch.save output are refused)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{name}: not a safetensors file (its header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BundleError(f"{name}: not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise BundleError(f"{name}: damaged safetensors file (tensor {key!r} lies outside the file)")
    return header


def _need(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in cfg:
        raise BundleError(f"{where}: missing '{key}'")
    value = cfg[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}: '{key}' must be {names}, not {type(value).__name__}")
    return value


def check_format_version(version: Any, where: str) -> int:
    """Refuse a missing, malformed or newer format version, naming the file."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: format_version {version!r} is not a bundle format version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this decipher-mr reads "
            f"(up to {FORMAT_VERSION}); upgrade decipher-mr to load it"
        )
    return version


def validate_config(cfg: Any, where: str = CONFIG) -> dict[str, Any]:
    """Check ``config.json``'s structure (not its files); return it.

    >>> validate_config(json.loads(Path("bundle/config.json").read_text()))
    """
    if not isinstance(cfg, dict):
        raise BundleError(f"{where}: must be a JSON object")
    check_format_version(cfg.get("format_version"), where)
    vision = _need(cfg, "vision", dict, where)
    _need(vision, "config", dict, f"{where} vision")
    _need(vision, "weights", str, f"{where} vision")
    _need(cfg, "preprocess", dict, where)
    if cfg.get("orientation") != ORIENTATION:
        raise BundleError(f"{where}: orientation {cfg.get('orientation')!r} is not {ORIENTATION!r}")
    alignment, text = cfg.get("alignment"), cfg.get("text")
    if (alignment is None) != (text is None):
        raise BundleError(f"{where}: 'alignment' and 'text' must both be present or both be null")
    if alignment is not None:
        _need(alignment, "embed_dim", int, f"{where} alignment")
        _need(alignment, "weights", str, f"{where} alignment")
        _need(text, "folder", str, f"{where} text")
        _need(text, "pooling", str, f"{where} text")
        _need(text, "max_length", int, f"{where} text")
    heads = _need(cfg, "heads", dict, where)
    for name, spec in heads.items():
        check_head_name(name, where)
        hw = f"{where} heads.{name}"
        if not isinstance(spec, dict):
            raise BundleError(f"{hw}: must be a JSON object")
        _need(spec, "task", str, hw)
        _need(spec, "config", dict, hw)
        _need(spec, "weights", str, hw)
        _need(spec, "labels", str, hw)
    return cfg
