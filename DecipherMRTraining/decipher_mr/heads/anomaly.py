"""Voxel-wise anomaly maps in [0, 1]: supervised from lesion masks, or unsupervised from normal studies.

The unsupervised model never sees a lesion. Patch tokens of normal studies are resized to a fixed
``stats_grid`` (so studies of different size line up position by position) and summarised per
position: a mean and diagonal variance (``gaussian``) or a bank of tokens (``knn``). A new study's
token scores its squared standardised distance (or mean k-NN distance) to that position's normal
tokens. Scores are calibrated on the normal studies themselves: the map is
``sigmoid((score - q99) / ((q99 - q50) / 4))``, so a typical normal token is near 0, the 99th
percentile of normal is 0.5 and anything far beyond normal approaches 1.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .configs import AnomalyConfig
from .dense import token_volume, upsample_to
from .segmentation import SegmentationHead


class SupervisedAnomalyHead(nn.Module):
    """One-channel segmentation decoder trained on lesion masks; returns logits (B, 1, X, Y, Z).

    ``anomaly_map`` gives the sigmoid, i.e. the [0, 1] map.

    >>> head = SupervisedAnomalyHead(AnomalyConfig(task="anomaly", embed_dim=64, labels=["anomaly"], layers=[1, 2, 2]))
    """

    def __init__(self, cfg: AnomalyConfig):
        super().__init__()
        self.config = cfg
        self.decoder = SegmentationHead(cfg, out_channels=1)

    @property
    def required_layers(self) -> tuple[int, ...]:
        return self.decoder.required_layers

    def forward(self, out, image: torch.Tensor | None = None, text=None) -> torch.Tensor:
        return self.decoder(out, image=image)

    def anomaly_map(self, out, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(out, image=image))


class NormalTokenModel(nn.Module):
    """Per-position model of normal patch tokens; ``forward`` returns the [0, 1] map (B, 1, X, Y, Z).

    >>> model = NormalTokenModel(AnomalyConfig(task="anomaly", embed_dim=64, labels=["anomaly"], mode="unsupervised"))
    >>> model.fit([encoder(x).patch_tokens for x in normal_views], grids)
    >>> amap = model(encoder(x), image=x)
    """

    required_layers: tuple[int, ...] = ()

    def __init__(self, cfg: AnomalyConfig):
        super().__init__()
        self.config = cfg
        p = int(torch.tensor(cfg.stats_grid).prod())
        d = cfg.embed_dim
        self.register_buffer("mean", torch.zeros(p, d))
        self.register_buffer("var", torch.ones(p, d))
        bank = cfg.bank_size if cfg.method == "knn" else 0
        self.register_buffer("bank", torch.zeros(bank, p, d))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("calibration", torch.tensor([0.0, 1.0]))  # q50, q99 of normal scores
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _on_stats_grid(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        vol = token_volume(tokens.float(), grid)
        vol = F.interpolate(vol, size=tuple(self.config.stats_grid), mode="trilinear", align_corners=False)
        return vol.flatten(2).transpose(1, 2)  # (B, P, D)

    @torch.no_grad()
    def fit(self, tokens: Iterable[torch.Tensor], grids: Iterable, valid: Iterable[torch.Tensor] | None = None,
            shrinkage: float = 4.0) -> "NormalTokenModel":
        """Fit on normal tissue: each element (B, N, D) patch tokens with its grid; ``valid`` (B, N)
        marks the tokens that are normal (e.g. not touching a known lesion), default all.

        Per-position variances are shrunk towards the global variance with a weight of ``shrinkage``
        pseudo-studies, so a handful of normal studies still gives a usable model.
        """
        tokens, grids = list(tokens), list(grids)
        x = torch.cat([self._on_stats_grid(t, g) for t, g in zip(tokens, grids)])  # (S, P, D)
        if valid is None:
            w = torch.ones(x.shape[:2])
        else:
            w = torch.cat([self._on_stats_grid(v[..., None].float(), g)[..., 0] for v, g in zip(valid, grids)])
            w = (w > 0.999).float()  # a position counts only where it is wholly normal
        if x.shape[0] < 2:
            raise ValueError("the normal-token model needs at least two normal studies")
        n = w.sum(0)[:, None]  # (P, 1)
        global_mean = (x * w[..., None]).sum((0, 1)) / w.sum().clamp_min(1)
        mean = torch.where(n > 0, (x * w[..., None]).sum(0) / n.clamp_min(1), global_mean)
        sq = ((x - mean) ** 2 * w[..., None]).sum(0)
        global_var = sq.sum(0) / w.sum().clamp_min(1)
        var = (sq + shrinkage * global_var) / (n + shrinkage)
        self.mean.copy_(mean)
        self.var.copy_(var.clamp_min(1e-6))
        if self.config.method == "knn":
            m = min(x.shape[0], self.bank.shape[0])
            filled = torch.where(w[..., None] > 0, x, mean)  # abnormal tokens stand in as the mean
            self.bank.zero_()
            self.bank[:m] = filled[:m]
            self.bank_count.fill_(m)
        # Calibrate on leave-one-out scores for knn (a token is its own nearest neighbour otherwise).
        scores = self._scores(x, leave_one_out=self.config.method == "knn")
        normal_scores = scores[w > 0] if (w > 0).any() else scores.flatten()
        q = torch.quantile(normal_scores[: 1_000_000], torch.tensor([0.5, 0.99]))
        self.calibration.copy_(q)
        self.fitted.fill_(True)
        return self

    def _scores(self, x: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
        if self.config.method == "gaussian":
            return ((x - self.mean) ** 2 / self.var).mean(-1)  # (B, P)
        bank = self.bank[: int(self.bank_count)]  # (S, P, D)
        d = ((x[:, None] - bank[None]) ** 2 / self.var).mean(-1)  # (B, S, P)
        if leave_one_out:
            eye = torch.eye(x.shape[0], bank.shape[0], dtype=torch.bool)
            d = d.masked_fill(eye[..., None], float("inf"))
        k = max(1, min(self.config.k, bank.shape[0] - int(leave_one_out)))
        return d.topk(k, dim=1, largest=False).values.mean(1)

    def score_grid(self, out) -> torch.Tensor:
        """Raw anomaly scores on the study's own token grid (B, 1, gx, gy, gz)."""
        x = self._on_stats_grid(out.patch_tokens, out.grid)
        s = self._scores(x).reshape(x.shape[0], 1, *self.config.stats_grid)
        return F.interpolate(s, size=tuple(out.grid), mode="trilinear", align_corners=False)

    def forward(self, out, image: torch.Tensor | None = None, text=None) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("the normal-token model is not fitted; fit it on normal studies first")
        q50, q99 = self.calibration.tolist()
        scale = max((q99 - q50) / 4.0, 1e-6)
        amap = torch.sigmoid((self.score_grid(out) - q99) / scale)
        shape = image.shape[2:] if image is not None else [g * 8 for g in out.grid]
        return upsample_to(amap, shape, 8).clamp(0, 1)

    def anomaly_map(self, out, image: torch.Tensor) -> torch.Tensor:
        return self.forward(out, image=image)


def build_anomaly_head(cfg: AnomalyConfig) -> nn.Module:
    """The supervised decoder or the unsupervised normal-token model, by ``cfg.mode``.

    >>> build_anomaly_head(AnomalyConfig(task="anomaly", embed_dim=64, labels=["anomaly"], mode="unsupervised"))
    """
    return SupervisedAnomalyHead(cfg) if cfg.mode == "supervised" else NormalTokenModel(cfg)
