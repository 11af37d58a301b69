"""Saving and loading a standalone vision encoder: ``encoder.safetensors`` + ``encoder.json``.

The JSON sidecar holds the :class:`VisionEncoderConfig` (it is also embedded in the safetensors
metadata, so the weights file alone is enough). Later stages (alignment, heads, the bundle) start
from such a file, usually exported from a stage-1 run's teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decipher_mr.models.vit3d import VisionEncoderConfig, VisionTransformer3D
from decipher_mr.storage import atomic_path, atomic_write_text

FORMAT = "decipher-mr-vision-encoder/1"


def save_vision_encoder(encoder: VisionTransformer3D, out: str | Path) -> Path:
    """Write the encoder's weights (safetensors) and config (JSON sidecar) atomically.

    >>> save_vision_encoder(enc, "runs/a/encoder.safetensors")     # + runs/a/encoder.json
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    cfg = encoder.config.to_json()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": cfg})
    atomic_write_text(out.with_suffix(".json"), cfg + "\n")
    return out


def load_vision_encoder(path: str | Path, map_location: str | torch.device = "cpu", run_loader=None) -> VisionTransformer3D:
    """Rebuild an encoder from ``save_vision_encoder``'s file (config from the sidecar or metadata).

    ``path`` may also omit the ``.safetensors`` suffix, or be a folder holding ``encoder.safetensors``
    or a stage-1 run folder: its ``encoder.safetensors``, else, when ``run_loader`` is given (training code
    passes ``decipher_mr.train.ssl.export.teacher_backbone_from_run``), the teacher backbone of its latest
    checkpoint. Model code reads no training checkpoints itself.

    >>> enc = load_vision_encoder("runs/a/encoder.safetensors").eval()
    """
    path = Path(path)
    if path.is_dir():
        if (path / "encoder.safetensors").exists():
            path = path / "encoder.safetensors"
        elif run_loader is not None:
            return run_loader(path).to(map_location)
        else:
            raise FileNotFoundError(
                f"{path}: no encoder.safetensors in this folder; export a stage-1 run's teacher with "
                f"`decipher-mr pretrain-vision --export-teacher {path} --out {path / 'encoder.safetensors'}`")
    elif not path.exists() and path.with_suffix(".safetensors").exists():
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"{path}: vision encoder weights not found")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    sidecar = path.with_suffix(".json")
    if "config" in meta:
        cfg_dict = json.loads(meta["config"])
    elif sidecar.exists():
        cfg_dict = json.loads(sidecar.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"{path}: no encoder config (neither in the file's metadata nor {sidecar.name})")
    encoder = VisionTransformer3D(VisionEncoderConfig.from_dict(cfg_dict))
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the encoder config: {exc}") from exc
    return encoder.to(map_location)
