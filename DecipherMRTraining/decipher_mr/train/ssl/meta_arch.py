"""Student and EMA teacher for DINO + iBOT, and the loss of one training step.

The student (backbone + DINO head + iBOT head) runs all crops in a single ``forward`` so that it can be
wrapped in ``DistributedDataParallel`` as is; the teacher is a copy updated by an exponential
moving average (``_foreach`` ops, no autograd) and only sees the global crops, unmasked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decipher_mr.models.vit3d import VisionEncoderConfig, VisionTransformer3D
from decipher_mr.train.monitor import effective_rank, mean_entropy
from decipher_mr.train.ssl.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss


class ProjectionHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes (no bias).

    >>> head = ProjectionHead(192, out_dim=1024)
    >>> head(torch.randn(4, 192)).shape
    torch.Size([4, 1024])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        # Prototypes are normalised in forward (weight norm with g = 1, as DINO's norm_last_layer).
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.prototypes, dim=-1, eps=1e-6).to(z.dtype))


@dataclass
class HeadConfig:
    dino_prototypes: int = 4096
    ibot_prototypes: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    layers: int = 3


class DinoIbotTower(nn.Module):
    """Backbone + DINO head + iBOT head: the student (and, copied, the teacher)."""

    def __init__(self, encoder_cfg: VisionEncoderConfig, heads: HeadConfig):
        super().__init__()
        self.backbone = VisionTransformer3D(encoder_cfg)
        d = encoder_cfg.embed_dim
        self.dino_head = ProjectionHead(d, heads.dino_prototypes, heads.hidden_dim, heads.bottleneck_dim, heads.layers)
        self.ibot_head = ProjectionHead(d, heads.ibot_prototypes, heads.hidden_dim, heads.bottleneck_dim, heads.layers)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor | None,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Student pass over every crop (masks apply to the global crops); the teacher uses
        :meth:`teacher_forward` instead. ``mask_indices`` (flat positions of the masked patches, from
        the collate) selects them without a host sync; without it the boolean mask is used."""
        g = self.backbone(global_crops, mask=masks)
        cls = [g.cls]
        if local_crops is not None and local_crops.shape[0]:
            cls.append(self.backbone(local_crops).cls)
        dino = self.dino_head(torch.cat(cls))
        return {"cls_global": g.cls, "dino": dino, "ibot": self.ibot_head(masked_tokens(g.patch_tokens, masks, mask_indices))}

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor, masks: torch.Tensor | None,
                        mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        g = self.backbone(global_crops)
        masked = masked_tokens(g.patch_tokens, masks, mask_indices)
        return {"cls_global": g.cls, "dino": self.dino_head(g.cls), "ibot": self.ibot_head(masked)}


def masked_tokens(patch_tokens: torch.Tensor, masks: torch.Tensor | None, mask_indices: torch.Tensor | None) -> torch.Tensor:
    """The (M, D) masked patch tokens of (2B, N, D) ``patch_tokens``, in ``masks``' row-major order."""
    if mask_indices is not None:
        return patch_tokens.flatten(0, 1).index_select(0, mask_indices)
    return patch_tokens[masks] if masks is not None else patch_tokens[:0, 0]


class SSLMetaArch(nn.Module):
    """Student, teacher and losses; ``training_loss`` computes one step's loss.

    >>> arch = SSLMetaArch(vision_config("vit-micro"), HeadConfig(256, 256, 128, 64))
    >>> loss, metrics = arch.training_loss(batch, teacher_temp=0.04)
    >>> loss.backward(); opt.step(); arch.update_teacher(momentum=0.996)
    """

    def __init__(self, encoder_cfg: VisionEncoderConfig, heads: HeadConfig, loss_cfg: dict[str, Any] | None = None):
        super().__init__()
        lc = {"dino_weight": 1.0, "ibot_weight": 1.0, "koleo_weight": 0.1, "student_temp": 0.1,
              "center_momentum": 0.9, "centering": "centering", **(loss_cfg or {})}
        self.loss_cfg = lc
        self.encoder_cfg, self.heads_cfg = encoder_cfg, heads
        self.student = DinoIbotTower(encoder_cfg, heads)
        self.teacher = copy.deepcopy(self.student)
        # The teacher never needs drop path or activation checkpointing.
        for blk in self.teacher.backbone.blocks:
            blk.drop_path_rate = 0.0
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(heads.dino_prototypes, lc["student_temp"], lc["center_momentum"], lc["centering"])
        self.ibot_loss = IBOTPatchLoss(heads.ibot_prototypes, lc["student_temp"], lc["center_momentum"], lc["centering"],
                                       chunk_rows=lc.get("ibot_chunk_rows"))
        self.koleo_loss = KoLeoLoss()
        # The module DDP wraps (set by the trainer); the bare student otherwise.
        self.student_runner: nn.Module = self.student

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint of this model must match to be loaded."""
        return {"encoder": self.encoder_cfg.architecture(), "heads": vars(self.heads_cfg).copy()}

    def training_loss(self, batch: dict[str, torch.Tensor], teacher_temp: float, monitor: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted DINO + iBOT + KoLeo loss of a collated multi-crop batch (see ``collate_multicrop``)."""
        lc = self.loss_cfg
        g, loc, masks = batch["global"], batch["local"], batch["masks"]
        n_global = 2
        b = g.shape[0] // n_global
        n_local = loc.shape[0] // max(b, 1)
        idx = batch.get("mask_indices")
        t = self.teacher.teacher_forward(g, masks, idx)
        s = self.student_runner(g, loc if n_local else None, masks, idx)

        with torch.autocast(device_type=g.device.type, enabled=False):
            t_dino = t["dino"].float()
            dino_targets = self.dino_loss.targets(t_dino, teacher_temp).chunk(n_global)
            dino = self.dino_loss(s["dino"].float().chunk(n_global + n_local), dino_targets)
            weight = batch.get("mask_weights")
            if weight is None:
                weight = (1.0 / masks.sum(dim=1, keepdim=True).clamp_min(1).float()).expand_as(masks)[masks]
            ibot_targets = self.ibot_loss.targets(t["ibot"].float(), teacher_temp)
            ibot = self.ibot_loss(s["ibot"].float(), ibot_targets, weight, n_samples=g.shape[0])
            # Summed over the global crops, as DINOv2 does (never between two crops of one image).
            koleo = sum(self.koleo_loss(c) for c in s["cls_global"].float().chunk(n_global))
            loss = lc["dino_weight"] * dino + lc["ibot_weight"] * ibot + lc["koleo_weight"] * koleo
            self.dino_loss.update_center(t_dino)
            # Called on every rank even without masked patches: it all-reduces under DDP.
            self.ibot_loss.update_center(t["ibot"].float())
        # Device tensors: the trainer fetches every scalar of a step with one host sync.
        metrics = {"loss/dino": dino.detach(), "loss/ibot": ibot.detach(), "loss/koleo": koleo.detach()}
        if monitor:
            metrics["monitor/teacher_entropy"] = mean_entropy(torch.cat(dino_targets))
            metrics["monitor/effective_rank"] = effective_rank(t["cls_global"].float())
        return loss, metrics

    def student_parts(self) -> dict[str, nn.Module]:
        """The parts whose gradients are clipped separately (as DINOv2): backbone, DINO head, iBOT head."""
        return {"backbone": self.student.backbone, "dino_head": self.student.dino_head, "ibot_head": self.student.ibot_head}

    def clip_gradients(self, max_norm: float | None) -> dict[str, torch.Tensor]:
        """Clip each part's gradient norm to ``max_norm`` on its own (none when ``max_norm`` is falsy);
        returns each part's norm before clipping (0-d device tensors: no host sync). One joint clip would let a head's large gradient
        shrink the backbone's step (and the reverse); DINOv2 clips backbone and heads separately.

        >>> norms = arch.clip_gradients(3.0)   # {"backbone": ..., "dino_head": ..., "ibot_head": ...}
        """
        limit = float(max_norm) if max_norm else float("inf")
        norms = {}
        for name, part in self.student_parts().items():
            params = [p for p in part.parameters() if p.grad is not None]
            norms[name] = (torch.nn.utils.clip_grad_norm_(params, limit) if params
                           else torch.zeros((), device=next(part.parameters()).device))
        return norms

    def param_groups(self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """AdamW groups of the student, following DINOv2's ``get_params_groups_with_decay``.

        * lr scale ``layer_decay ** (depth + 1 - layer)``: layer 0 is the embedding (``patch_embed``,
          ``pos_embed``, ``cls_pos`` -- the class token's position embedding -- and the tokens),
          block ``i`` is layer ``i + 1``, the final norm and the heads are layer ``depth + 1`` (scale 1);
        * ``patch_embed`` gets a further ``patch_embed_lr_mult`` (DINOv2: 0.2);
        * no weight decay on biases, norms, LayerScale, tokens and position embeddings (``pos_embed``
          and ``cls_pos`` alike; DINOv2 decays tokens and ``pos_embed``, DINO/iBOT and this project do not);
        * the heads' prototypes are flagged ``last_layer`` (frozen for the first
          ``optim.freeze_last_layer_iterations``, DINOv2's ``freeze_last_layer_epochs``).

        Each group carries ``lr_scale``/``wd_scale`` for :func:`~decipher_mr.train.schedules.apply_to_optimizer`.
        """
        depth = len(self.student.backbone.blocks)
        embedding = ("patch_embed.", "pos_embed", "cls_pos", "cls_token", "mask_token", "register_tokens")
        groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
        for name, param in self.student.named_parameters():
            if not param.requires_grad:
                continue
            local = name.split(".", 1)[1] if name.startswith("backbone.") else None
            if local is None:
                layer = depth + 1
            elif local.startswith("blocks."):
                layer = int(local.split(".")[1]) + 1
            elif local.startswith(embedding):
                layer = 0
            else:
                layer = depth + 1
            lr_scale = layer_decay ** (depth + 1 - layer)
            if local is not None and local.startswith("patch_embed."):
                lr_scale *= patch_embed_lr_mult
            no_wd = (param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
                     or (local is not None and local.startswith(("pos_embed", "cls_pos", "cls_token", "mask_token", "register_tokens"))))
            wd_scale = 0.0 if no_wd else 1.0
            last_layer = name.endswith("head.prototypes")
            key = (round(lr_scale, 12), wd_scale, last_layer)
            group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": lr_scale, "wd_scale": wd_scale,
                                            "last_layer": last_layer})
            group["params"].append(param)
            group["names"].append(name)
        return list(groups.values())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, over all parameters at once."""
        t = list(self.teacher.parameters())
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)
