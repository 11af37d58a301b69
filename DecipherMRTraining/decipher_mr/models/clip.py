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

EMBED_DIM = 512
# The temperature's start and bound (CLIP's): the model owns them, the loss (train/clip_loss.py) reads them.
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


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
        # the image view the projection was trained on (decipher_mr.data.views): the served embedding
        # embeds the same view; None (older models) pools the whole volume's tokens instead
        self.image_view: dict[str, Any] | None = None
        # feature standardisation before the projections (identity until set_feature_statistics; older
        # models and bundles without these buffers keep the identity)
        self.register_buffer("image_center", torch.zeros(2 * width))
        self.register_buffer("image_scale", torch.ones(2 * width))
        self.register_buffer("text_center", torch.zeros(text.hidden_size))
        self.register_buffer("text_scale", torch.ones(text.hidden_size))

    # -- image side
    def image_pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """``cls ⊕ mean(patch tokens)`` of the vision encoder, before projection (B, 2·width)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tower_is_frozen(self.vision)):
            out = self.vision(volumes)
        return torch.cat([out.cls, out.patch_tokens.mean(1)], dim=-1)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._project(pooled, self.image_center, self.image_scale, self.image_proj)

    @staticmethod
    def _project(pooled: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """Standardised features through the projection, in fp32 even under autocast: the pooled features
        of different volumes share a large common part, and their differences are below bf16's resolution
        (measured on the demo: every image embedding identical in bf16)."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            z = (pooled.float() - center) / scale
            return F.normalize(proj(z), dim=-1)

    @torch.no_grad()
    def set_feature_statistics(self, image_pooled: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None) -> None:
        """Centre and scale of the pooled features (mean, and the RMS spread about it, over training items), applied
        before the projections; stage 2 sets them once before its first step. Saved with the model."""
        for feats, center, scale in ((image_pooled, self.image_center, self.image_scale),
                                     (text_pooled, self.text_center, self.text_scale)):
            if feats is not None and len(feats) > 1:
                feats = feats.detach().float().to(center.device)
                center.copy_(feats.mean(0))
                # one scale for all dimensions (the features' overall spread about the centre): the
                # geometry of the features is kept, only the common part goes and the size is unit
                spread = (feats - feats.mean(0)).pow(2).mean().sqrt()
                scale.fill_(float(spread.clamp_min(1e-8)))

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_pooled(volumes))

    # -- text side
    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tower_is_frozen(self.text)):
            return self.text(input_ids, attention_mask)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._project(pooled, self.text_center, self.text_scale, self.text_proj)

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


# ---------------------------------------------------------------------------------------------
# building from a run config, export and loading

MODEL_FORMAT = 1
# buffers that older exports lack (then the identity: no standardisation)
FEATURE_STATISTICS = ("image_center", "image_scale", "text_center", "text_scale")


class AlignedModelError(RuntimeError):
    """An aligned-model folder that cannot be used; the message names the file and the reason."""


def build_vision_from_spec(spec: str | dict, run_loader=None) -> nn.Module:
    """The image tower: ``{"preset": "vit-micro", ...overrides}`` (random init, for tests and demos),
    ``{"config": {...}}`` or ``{"export": "runs/vision/encoder"}`` (the stage-1 export).

    ``run_loader`` reads a stage-1 run folder that holds no exported encoder (training code passes
    ``decipher_mr.train.ssl.export.teacher_backbone_from_run``; model code never imports training code).

    >>> build_vision_from_spec({"preset": "vit-micro"})
    """
    from decipher_mr.models import vit3d

    if isinstance(spec, str):
        spec = {"preset": spec} if spec in vit3d.PRESETS else {"export": spec}
    spec = dict(spec)
    if spec.get("export"):
        from decipher_mr.models.vision_weights import load_vision_encoder as loader

        return loader(spec["export"], run_loader=run_loader)
    if "config" in spec:
        return vit3d.build_vision_encoder(spec["config"])
    if "preset" in spec:
        return vit3d.build_vision_encoder(spec)
    raise ValueError(f"vision spec {spec!r} needs 'preset', 'config' or 'export'")


def model_record(model: ImageTextModel) -> dict[str, Any]:
    """The JSON description that rebuilds ``model``'s shapes (stored with exports and checkpoints)."""
    cfg = getattr(model.vision, "config", None)
    return {
        "format": MODEL_FORMAT,
        "embed_dim": model.embed_dim,
        "vision": cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {},
        "text": {
            "pooling": model.text.pooling,
            "max_length": model.text.max_length,
            "hidden_size": model.text.hidden_size,
            "source": model.text.source,
            "config": model.text.backbone.config.to_dict(),
        },
        "image_pooling": "cls+mean_patch",
        "image_view": model.image_view,
        "logit_scale_max": MAX_LOGIT_SCALE,
    }


def save_image_text_model(model: ImageTextModel, folder: str | Any, extra: dict[str, Any] | None = None) -> None:
    """Export ``folder/{config.json, clip.safetensors, text_encoder/}`` atomically (temp dir + rename).

    ``clip.safetensors`` holds the vision tower, projections and temperature; the text backbone
    and its tokenizer are a Hugging Face folder so other tools can read them.

    >>> save_image_text_model(model, "runs/align/model")
    """
    import json

    from safetensors.torch import save_file

    from decipher_mr.storage import atomic_folder

    with atomic_folder(folder) as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
                 if not k.startswith("text.backbone.")}
        save_file(state, str(tmp / "clip.safetensors"))
        model.text.save_pretrained(tmp / "text_encoder")
        record = {**model_record(model), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(record, indent=2))


def load_image_text_model(path: str | Any) -> ImageTextModel:
    """Load an exported aligned model: a run folder (uses ``RUN/model``) or the model folder itself.

    >>> model = load_image_text_model("runs/align")
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from decipher_mr.models.text import TextTower, load_text_backbone

    folder = Path(path)
    if (folder / "model" / "config.json").exists():
        folder = folder / "model"
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise AlignedModelError(f"{folder}: not an aligned model (no config.json); run `decipher-mr align` first")
    try:
        record = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AlignedModelError(f"{cfg_path}: damaged ({exc})") from exc
    if record.get("format", 0) > MODEL_FORMAT:
        raise AlignedModelError(f"{cfg_path}: model format {record['format']} is newer than this version reads")
    from decipher_mr.models.vit3d import build_vision_encoder

    vision = build_vision_encoder(record["vision"])
    backbone, tokenizer, _ = load_text_backbone(folder / "text_encoder")
    text = TextTower(backbone, tokenizer, pooling=record["text"]["pooling"], max_length=record["text"]["max_length"],
                     source=record["text"].get("source"))
    model = ImageTextModel(vision, text, embed_dim=int(record["embed_dim"]))
    model.image_view = record.get("image_view")
    weights_path = folder / "clip.safetensors"
    if not weights_path.exists():
        raise AlignedModelError(f"{weights_path}: missing")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise AlignedModelError(f"{weights_path}: cannot be read ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text.backbone.") and k not in FEATURE_STATISTICS]
    if missing or unexpected:
        raise AlignedModelError(f"{weights_path}: does not fit the model in config.json "
                                f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.eval()
    return model
