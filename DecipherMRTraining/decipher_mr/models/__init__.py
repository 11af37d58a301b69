"""Model definitions shared by training and inference."""

from decipher_mr.models.vit3d import (
    PRESETS,
    EncoderOutput,
    VisionEncoderConfig,
    VisionTransformer3D,
    bf16_is_fast,
    build_vision_encoder,
    precision_context,
    resolve_precision,
    vision_config,
)
from decipher_mr.models.vision_weights import load_vision_encoder, save_vision_encoder

__all__ = [
    "PRESETS",
    "EncoderOutput",
    "VisionEncoderConfig",
    "VisionTransformer3D",
    "bf16_is_fast",
    "build_vision_encoder",
    "load_vision_encoder",
    "precision_context",
    "resolve_precision",
    "save_vision_encoder",
    "vision_config",
]
