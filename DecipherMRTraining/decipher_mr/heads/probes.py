"""Linear and attentive-pooling probes on the class embedding and pooled patch tokens.

Classification returns logits ``(B, K)``; regression returns values ``(B, K)`` in the target's own
units (the normalisation statistics are buffers, so the saved head is self-contained).
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import ProbeConfig


class AttentivePool(nn.Module):
    """One learnt query attending over the patch tokens (V-JEPA / DINOv2-style attentive probe)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        heads = num_heads if dim % num_heads == 0 else 1
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens)
        out, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)
        return out[:, 0]


class Probe(nn.Module):
    """Class token ⊕ pooled patch tokens -> LayerNorm -> (MLP) -> K outputs.

    >>> probe = Probe(ProbeConfig(task="classify", embed_dim=64, labels=["a", "b"]))
    >>> probe(encoder_output).shape        # (B, 2)
    """

    required_layers: tuple[int, ...] = ()

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        if not cfg.labels:
            raise ValueError("a probe needs at least one label (class names or regression targets)")
        self.config = cfg
        d = cfg.embed_dim
        self.pool = AttentivePool(d, cfg.num_heads) if cfg.pooling == "attentive" else None
        self.norm = nn.LayerNorm(2 * d)
        k = len(cfg.labels)
        if cfg.hidden:
            self.mlp = nn.Sequential(nn.Linear(2 * d, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, k))
        else:
            self.mlp = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * d, k))
        mean = cfg.target_mean or [0.0] * k
        std = cfg.target_std or [1.0] * k
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float32))

    def features(self, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(tokens) if self.pool is not None else tokens.mean(1)
        return self.norm(torch.cat([cls, pooled], dim=-1).float())

    def raw(self, out, image=None, text=None) -> torch.Tensor:
        """Outputs before de-normalisation (what the regression loss compares to normalised targets)."""
        return self.mlp(self.features(out.cls.float(), out.patch_tokens.float()))

    def forward(self, out, image=None, text=None) -> torch.Tensor:
        y = self.raw(out)
        if self.config.task == "regress":
            y = y * self.target_std + self.target_mean
        return y

    def normalise_targets(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std


def build_probe(task: str, cfg: ProbeConfig) -> Probe:
    """A probe for ``classify`` or ``regress``.

    >>> build_probe("regress", ProbeConfig(task="regress", embed_dim=64, labels=["lesion_volume_ml"]))
    """
    if task not in ("classify", "regress"):
        raise ValueError(f"a probe does 'classify' or 'regress', not {task!r}")
    return Probe(cfg)
