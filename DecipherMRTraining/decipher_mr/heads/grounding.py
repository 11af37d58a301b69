"""Text-prompted grounding: text embedding + patch tokens -> 3D heatmap, mask and box.

Each patch token (with its explicit patch-centre coordinates) and the text embedding are projected
to a common width and fused by FiLM (the phrase scales and shifts the token features), then read out to one logit per token; the
token logits are up-sampled trilinearly to voxels. It is trained on (phrase, region) pairs: the
target of a token is the fraction of its voxels inside the named region.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import GroundConfig
from .dense import box_from_heatmap, coordinate_tokens, largest_component, peak_voxel, token_volume, upsample_to


class GroundingHead(nn.Module):
    """``head(out, image=x, text=t)`` -> token logits folded to voxels (B, 1, X, Y, Z).

    ``text`` is (B, text_dim): one phrase per volume (repeat the volume's output for several phrases).

    >>> head = GroundingHead(GroundConfig(task="ground", embed_dim=64, text_dim=384))
    >>> heat = torch.sigmoid(head(encoder(x), image=x, text=minilm.encode(["left hippocampus"])))
    """

    required_layers: tuple[int, ...] = ()

    def __init__(self, cfg: GroundConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden
        self.token_norm = nn.LayerNorm(cfg.embed_dim)
        self.token_proj = nn.Linear(cfg.embed_dim + 3, h)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, 2 * h)
        self.readout = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    def token_logits(self, out, text: torch.Tensor) -> torch.Tensor:
        """Logits per token (B, 1, gx, gy, gz)."""
        tok = self.token_norm(out.patch_tokens.float())
        coords = coordinate_tokens(out.grid, tok.device).expand(tok.shape[0], -1, -1)
        scale, shift = self.text_proj(self.text_norm(text.float()))[:, None].chunk(2, dim=-1)
        # FiLM: the phrase rescales and shifts every token feature, so "left" can flip a direction.
        fused = self.token_proj(torch.cat([tok, coords], -1)) * (1 + scale) + shift
        return token_volume(self.readout(fused), out.grid)

    def forward(self, out, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
        if text is None:
            raise ValueError("the grounding head needs a text embedding")
        if text.shape[-1] != self.config.text_dim:
            raise ValueError(f"text embedding has {text.shape[-1]} dims; this head was trained on {self.config.text_dim} "
                             f"({self.config.text_source or 'its text encoder'})")
        shape = image.shape[2:] if image is not None else [g * 8 for g in out.grid]
        return upsample_to(self.token_logits(out, text), shape, self.config.patch_size)

    @torch.no_grad()
    def ground(self, out, image: torch.Tensor, text: torch.Tensor) -> dict:
        """Heatmap in [0, 1], the mask (largest component above threshold) and its box, per batch item.

        >>> res = head.ground(encoder(x), x, text)[0]; res["box"]      # [i0, j0, k0, i1, j1, k1]
        """
        grid_logits = self.token_logits(out, text)
        heat = torch.sigmoid(upsample_to(grid_logits, image.shape[2:], self.config.patch_size))[:, 0].cpu().numpy()
        results = []
        for h, g in zip(heat, grid_logits[:, 0].float().cpu().numpy()):
            mask = largest_component(h >= self.config.threshold)
            results.append({"heatmap": h, "mask": mask, "box": box_from_heatmap(h, self.config.threshold),
                            "peak": peak_voxel(g, h.shape, heat=h, threshold=self.config.threshold)})
        return results
