"""Boxes for named structures: one token heatmap per structure, read out as a box.

The head predicts, for every patch token, the fraction of its voxels inside each structure
(``config.labels``); up-sampled to voxels and thresholded, the largest component's bounding box is
the answer and the heatmap's peak is the pointing answer. Heatmap-to-box keeps the head tiny and
its output inspectable (the heatmap is shown next to the box).
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import LocalizeConfig
from .dense import box_from_heatmap, coordinate_tokens, peak_voxel, token_volume, upsample_to


class LocalizationHead(nn.Module):
    """``head(out, image=x)`` -> per-structure logits (B, K, X, Y, Z); ``locate`` gives boxes.

    >>> head = LocalizationHead(LocalizeConfig(task="localize", embed_dim=64, labels=["frontal", "occipital"]))
    >>> boxes = head.locate(encoder(x), x)[0]        # {"frontal": {"box": [...], "peak": [...]}, ...}
    """

    required_layers: tuple[int, ...] = ()

    def __init__(self, cfg: LocalizeConfig):
        super().__init__()
        if not cfg.labels:
            raise ValueError("a localization head needs structure names (labels)")
        self.config = cfg
        h = cfg.hidden
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.embed_dim + 3, h), nn.GELU(), nn.Linear(h, h), nn.GELU(),
                                 nn.Linear(h, len(cfg.labels)))

    def token_logits(self, out) -> torch.Tensor:
        tok = self.norm(out.patch_tokens.float())
        coords = coordinate_tokens(out.grid, tok.device).expand(tok.shape[0], -1, -1)
        return token_volume(self.mlp(torch.cat([tok, coords], -1)), out.grid)

    def forward(self, out, image: torch.Tensor | None = None, text=None) -> torch.Tensor:
        shape = image.shape[2:] if image is not None else [g * 8 for g in out.grid]
        return upsample_to(self.token_logits(out), shape, self.config.patch_size)

    @torch.no_grad()
    def locate(self, out, image: torch.Tensor) -> list[dict[str, dict]]:
        """Per batch item, per structure: ``box`` (half-open voxel box), ``peak`` voxel and ``score``."""
        grid_logits = self.token_logits(out)
        heat = torch.sigmoid(upsample_to(grid_logits, image.shape[2:], self.config.patch_size)).cpu().numpy()
        results = []
        for per_item, per_grid in zip(heat, grid_logits.float().cpu().numpy()):
            found = {}
            for name, h, g in zip(self.config.labels, per_item, per_grid):
                found[name] = {"box": box_from_heatmap(h, self.config.threshold), "peak": peak_voxel(g, h.shape, heat=h, threshold=self.config.threshold),
                               "score": float(h.max()), "heatmap": h}
            results.append(found)
        return results
