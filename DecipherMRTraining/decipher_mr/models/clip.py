"""Image and report towers joined in one 512-d space, with a learnable temperature.

The image side pools the ViT's class token together with the mean of its patch tokens (the class
token alone under-uses the dense iBOT features; the mean alone loses DINO's global summary), the
text side pools the BERT tokens (:class:`~decipher_mr.models.text.TextTower`). Each goes through a
linear projection to ``embed_dim`` and is L2-normalised. The temperature is stored as
``logit_scale = log(1/T)``, starts at ``log(1/0.07)`` and is clamped to at most ``log(100)``.

Freezing is per tower: ``"all"`` (train everything), ``"frozen"`` (train nothing but the
projection) or an integer K (train only the last K transformer blocks and what follows them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decipher_mr.models.text import TextTower
from decipher_mr.train.clip_loss import INIT_TEMPERATURE, MAX_LOGIT_SCALE

EMBED_DIM = 512


def vision_width(vision: nn.Module) -> int:
    """Token width of a vision encoder (``embed_dim`` attribute, or its config's)."""
    for holder in (vision, getattr(vision, "config", None), getattr(vision, "cfg", None)):
        for name in ("embed_dim", "dim", "hidden_size"):
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int):
                return value
    raise ValueError(f"cannot tell the width of vision encoder {type(vision).__name__} (no embed_dim)")


def _blocks(tower: nn.Module) -> nn.ModuleList:
    for path in ("blocks", "backbone.encoder.layer", "encoder.layer", "layers"):
        obj: Any = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(tower).__name__}: cannot find its transformer blocks to partially unfreeze")


def set_tower_trainable(tower: nn.Module, trainable: str | int) -> None:
    """Train all of ``tower``, none of it, or its last K blocks (plus the norms after them).

    >>> set_tower_trainable(model.vision, 2)     # fine-tune the last two ViT blocks
    """
    if trainable in ("all", None, -1):
        tower.requires_grad_(True)
        return
    tower.requires_grad_(False)
    if trainable in ("frozen", "none", 0):
        return
    k = int(trainable)
    if k < 0:
        raise ValueError(f"number of blocks to unfreeze must be >= 0 or 'all', not {trainable!r}")
    blocks = _blocks(tower)
    for block in list(blocks)[len(blocks) - min(k, len(blocks)) :]:
        block.requires_grad_(True)
    # final norms sit after the last block and shape every output feature
    for name, module in tower.named_children():
        if "norm" in name.lower():
            module.requires_grad_(True)


def tower_is_frozen(tower: nn.Module) -> bool:
    return not any(p.requires_grad for p in tower.parameters())


class ImageTextModel(nn.Module):
    """Vision encoder + text tower + two projections + ``logit_scale``.

    >>> model = ImageTextModel(build_vision_encoder("vit-tiny"), TextTower.from_spec({"tiny": True}))
    >>> img = model.encode_image(volumes)               # (B, 512), unit norm
    >>> txt = model.encode_text(**vars(model.text.tokenize(reports)))
    """

    def __init__(self, vision: nn.Module, text: TextTower, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        width = vision_width(vision)
        self.image_proj = nn.Linear(2 * width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))

    # -- image side
    def image_pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """``cls ⊕ mean(patch tokens)`` of the vision encoder, before projection (B, 2·width)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tower_is_frozen(self.vision)):
            out = self.vision(volumes)
        return torch.cat([out.cls, out.patch_tokens.mean(1)], dim=-1)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_pooled(volumes))

    # -- text side
    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tower_is_frozen(self.text)):
            return self.text(input_ids, attention_mask)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text_pooled(input_ids, attention_mask))

    @torch.no_grad()
    def encode_reports(self, reports: list[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm embeddings of many reports (length-bucketed batches)."""
        return self.project_text(self.text.encode(reports, batch_size=batch_size))

    # -- temperature
    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` with the clamp applied in the graph too (the optimiser may overshoot)."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def set_trainable(self, vision: str | int = "all", text: str | int = "all") -> None:
        """Freeze/unfreeze each tower (the projections and temperature always train)."""
        set_tower_trainable(self.vision, vision)
        set_tower_trainable(self.text, text)
        for p in (*self.image_proj.parameters(), *self.text_proj.parameters(), self.logit_scale):
            p.requires_grad_(True)

    def set_frozen_towers_eval(self) -> None:
        """Switch frozen towers to eval mode (no dropout noise in features that never train)."""
        for tower in (self.vision, self.text):
            if tower_is_frozen(tower):
                tower.eval()
