"""Export the teacher backbone of a stage-1 run as a standalone encoder file for later stages.

The teacher (EMA of the student) is the better encoder at the end of DINO-style training, so that
is what alignment, heads and the model bundle start from.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from decipher_mr.models.vision_weights import save_vision_encoder
from decipher_mr.models.vit3d import VisionEncoderConfig, VisionTransformer3D
from decipher_mr.train.checkpoint import CheckpointError, latest_checkpoint, read_manifest

TEACHER_PREFIX = "teacher.backbone."


def _checkpoint_of(run_or_checkpoint: str | Path) -> Path:
    p = Path(run_or_checkpoint)
    if (p / "manifest.json").exists():
        return p
    for root in (p / "checkpoints", p):
        ck = latest_checkpoint(root) if root.is_dir() else None
        if ck is not None:
            return ck
    raise CheckpointError(f"{p}: no stage-1 checkpoint found (expected {p / 'checkpoints'}/ckpt-*/manifest.json)")


def teacher_backbone_from_run(run_or_checkpoint: str | Path) -> VisionTransformer3D:
    """The teacher encoder of a run folder's latest checkpoint (or of a given checkpoint folder).

    >>> enc = teacher_backbone_from_run("runs/vit-small-demo")
    """
    ck = _checkpoint_of(run_or_checkpoint)
    read_manifest(ck)  # verifies checksums before anything is trusted
    state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
    cfg_dict = state.get("stage", {}).get("encoder_config")
    if cfg_dict is None:
        raise CheckpointError(f"{ck / 'trainer_state.json'}: no encoder_config; not a stage-1 (pretrain-vision) checkpoint")
    cfg = VisionEncoderConfig.from_dict(cfg_dict)
    cfg.drop_path_rate, cfg.activation_checkpointing = 0.0, False
    weights = load_file(str(ck / "weights.safetensors"))
    sd = {k[len(TEACHER_PREFIX) :]: v for k, v in weights.items() if k.startswith(TEACHER_PREFIX)}
    if not sd:
        raise CheckpointError(f"{ck / 'weights.safetensors'}: holds no teacher backbone weights")
    enc = VisionTransformer3D(cfg)
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ck / 'weights.safetensors'}: teacher weights do not fit the stored config: {exc}") from exc
    return enc.eval()


def export_teacher_backbone(run_or_checkpoint: str | Path, out: str | Path) -> Path:
    """Write the teacher backbone as ``out`` (.safetensors) + its config JSON; returns the weights path.

    >>> export_teacher_backbone("runs/vit-small-demo", "runs/vit-small-demo/encoder.safetensors")
    """
    return save_vision_encoder(teacher_backbone_from_run(run_or_checkpoint), out)
