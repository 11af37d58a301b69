"""Voxel-wise anomaly maps in [0, 1]: supervised from lesion masks, or unsupervised from normal studies.

The unsupervised model never sees a lesion. Patch tokens of normal studies are resized to a fixed
``stats_grid`` (so studies of different size line up position by position) and summarised per
position: a mean and diagonal variance (``gaussian``) or a bank of tokens (``knn``). A new study's
token scores its squared standardised distance (or mean k-NN distance) to that position's normal
tokens. Scores are calibrated on the normal studies themselves: the map is
``sigmoid((score - q99) / ((q99 - q50) / 4))``, so a typical normal token is near 0, the 99th
percentile of normal is 0.5 and anything far beyond normal approaches 1.

A T1 brain and a T2 brain give very different normal tokens at the same position; pooled, the
spread of normal is so wide that lesions score lower than normal tissue of another sequence (on
the demo's held-out brain lesions, T1 voxel AUROC 0.20). So each ``condition_on`` group (body
region and sequence) with at least three normal studies gets its own statistics, calibrated on
leave-one-study-out scores (in-sample scores of a few studies underestimate a new study's normal
spread); a study whose group is unknown or unfitted is scored by the pooled model.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

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

    def anomaly_map(self, out, image: torch.Tensor, context=None) -> torch.Tensor:
        return torch.sigmoid(self.forward(out, image=image))  # context: only the unsupervised model uses it


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
        # Group buffers exist only when groups were fitted, so heads saved without them still load.
        if cfg.normal_groups:
            self._register_groups(len(cfg.normal_groups))

    def _register_groups(self, g: int) -> None:
        p, d = self.mean.shape
        self.register_buffer("group_mean", torch.zeros(g, p, d))
        self.register_buffer("group_var", torch.ones(g, p, d))
        self.register_buffer("group_calibration", torch.tensor([[0.0, 1.0]] * g))
        self.register_buffer("bank_group", torch.full((self.bank.shape[0],), -1, dtype=torch.long))

    def group_of(self, context: Any) -> str | None:
        """``"brain/T1"`` for a study's metadata (a mapping or an object with those attributes), None when unknown.

        >>> model.group_of({"body_region": "brain", "sequence": "T1"})
        """
        if context is None or not self.config.condition_on:
            return None
        get = context.get if isinstance(context, dict) else (lambda k: getattr(context, k, None))
        parts = [get(k) for k in self.config.condition_on]
        return None if any(v in (None, "") for v in parts) else "/".join(str(v) for v in parts)

    def _group_index(self, context: Any) -> int:
        key = self.group_of(context)
        return self.config.normal_groups.index(key) if key in self.config.normal_groups else -1

    def _on_stats_grid(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        vol = token_volume(tokens.float(), grid)
        vol = F.interpolate(vol, size=tuple(self.config.stats_grid), mode="trilinear", align_corners=False)
        return vol.flatten(2).transpose(1, 2)  # (B, P, D)

    @torch.no_grad()
    def fit(self, tokens: Iterable[torch.Tensor], grids: Iterable, valid: Iterable[torch.Tensor] | None = None,
            shrinkage: float = 4.0, context: Sequence[Any] | None = None) -> "NormalTokenModel":
        """Fit on normal tissue: each element (B, N, D) patch tokens with its grid; ``valid`` (B, N)
        marks the tokens that are normal (e.g. not touching a known lesion), default all;
        ``context`` gives each study's metadata (body region, sequence) in order, default unknown.

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
        keys = [self.group_of(c) for c in context] if context is not None else [None] * x.shape[0]
        if len(keys) != x.shape[0]:
            raise ValueError(f"context has {len(keys)} entries for {x.shape[0]} normal studies")
        members: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                members.setdefault(key, []).append(i)
        groups = sorted(k for k, m in members.items() if len(m) >= 3)  # leave-one-out needs two left
        mean, var = self._moments(x, w, shrinkage)
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.config.normal_groups = groups
        for name in ("group_mean", "group_var", "group_calibration", "bank_group"):
            self._buffers.pop(name, None)  # a refit drops the previous fit's groups
        if groups:
            self._register_groups(len(groups))
        slot = torch.full((x.shape[0],), -1, dtype=torch.long)
        if self.config.method == "knn":
            # Round-robin over groups so a full bank still holds every group's studies.
            queues = [list(members[g]) for g in groups] + [[i for i in range(x.shape[0]) if keys[i] not in groups]]
            order = []
            while any(queues):
                order += [q.pop(0) for q in queues if q]
            order = order[: self.bank.shape[0]]
            filled = torch.where(w[..., None] > 0, x, mean)  # abnormal tokens stand in as the mean
            self.bank.zero_()
            self.bank[: len(order)] = filled[order]
            self.bank_count.fill_(len(order))
            slot[order] = torch.arange(len(order))
            if groups:
                self.bank_group.copy_(torch.tensor([groups.index(keys[i]) if keys[i] in groups else -1 for i in order]
                                                   + [-1] * (self.bank.shape[0] - len(order))))
        # Calibrate on leave-one-out scores for knn (a token is its own nearest neighbour otherwise).
        scores = self._scores(x, own_slot=slot if self.config.method == "knn" else None)
        self.calibration.copy_(self._quantiles(scores, w))
        for gi, g in enumerate(groups):
            idx = members[g]
            gm, gv = self._moments(x[idx], w[idx], shrinkage)
            self.group_mean[gi] = gm
            self.group_var[gi] = gv
            if self.config.method == "knn":
                held = self._scores(x[idx], own_slot=slot[idx], group=gi)
            else:
                rest = [[i for i in idx if i != j] for j in idx]
                held = torch.cat([self._gaussian(x[j:j + 1], *self._moments(x[r], w[r], shrinkage)) for j, r in zip(idx, rest)])
            self.group_calibration[gi] = self._quantiles(held, w[idx])
        self.fitted.fill_(True)
        return self

    @staticmethod
    def _moments(x: torch.Tensor, w: torch.Tensor, shrinkage: float):
        n = w.sum(0)[:, None]  # (P, 1)
        global_mean = (x * w[..., None]).sum((0, 1)) / w.sum().clamp_min(1)
        mean = torch.where(n > 0, (x * w[..., None]).sum(0) / n.clamp_min(1), global_mean)
        sq = ((x - mean) ** 2 * w[..., None]).sum(0)
        global_var = sq.sum(0) / w.sum().clamp_min(1)
        var = (sq + shrinkage * global_var) / (n + shrinkage)
        return mean, var.clamp_min(1e-6)

    @staticmethod
    def _quantiles(scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        normal_scores = scores[w > 0] if (w > 0).any() else scores.flatten()
        return torch.quantile(normal_scores[: 1_000_000], torch.tensor([0.5, 0.99]))

    @staticmethod
    def _gaussian(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return ((x - mean) ** 2 / var).mean(-1)  # (B, P)

    def _scores(self, x: torch.Tensor, own_slot: torch.Tensor | None = None, group: int = -1) -> torch.Tensor:
        """Raw scores (B, P); ``own_slot`` masks each study's own bank entry (leave-one-out), ``group``
        uses that group's statistics (-1: pooled)."""
        if self.config.method == "gaussian":
            if group >= 0:
                return self._gaussian(x, self.group_mean[group], self.group_var[group])
            return self._gaussian(x, self.mean, self.var)
        count = int(self.bank_count)
        bank = self.bank[:count]  # (S, P, D)
        var = self.group_var[group] if group >= 0 else self.var
        d = ((x[:, None] - bank[None]) ** 2 / var).mean(-1)  # (B, S, P)
        usable = torch.ones(x.shape[0], count, dtype=torch.bool)
        in_group = self.bank_group[:count] == group if group >= 0 else None
        if in_group is not None and int(in_group.sum()) >= 2:  # else the bank was too small: use all of it
            usable &= in_group[None]
        if own_slot is not None:
            usable &= own_slot[:, None] != torch.arange(count)[None]
        d = d.masked_fill(~usable[..., None], float("inf"))
        k = max(1, min(self.config.k, int(usable.sum(1).min())))
        return d.topk(k, dim=1, largest=False).values.mean(1)

    def score_grid(self, out, context: Sequence[Any] | None = None) -> torch.Tensor:
        """Raw anomaly scores on the study's own token grid (B, 1, gx, gy, gz)."""
        return self._scored(out, context)[0]

    def _scored(self, out, context: Sequence[Any] | None):
        x = self._on_stats_grid(out.patch_tokens, out.grid)
        groups = [self._group_index(c) for c in context] if context is not None else [-1] * x.shape[0]
        if len(groups) != x.shape[0]:
            raise ValueError(f"context has {len(groups)} entries for a batch of {x.shape[0]}")
        s = torch.cat([self._scores(x[b:b + 1], group=g) for b, g in enumerate(groups)])
        s = F.interpolate(s.reshape(x.shape[0], 1, *self.config.stats_grid), size=tuple(out.grid),
                          mode="trilinear", align_corners=False)
        calib = torch.stack([self.group_calibration[g] if g >= 0 else self.calibration for g in groups])
        return s, calib

    def forward(self, out, image: torch.Tensor | None = None, text=None,
                context: Sequence[Any] | None = None) -> torch.Tensor:
        """The [0, 1] map; ``context`` gives each study's metadata (body region, sequence) so it is
        scored by its own group's statistics, None: the pooled model."""
        if not bool(self.fitted):
            raise RuntimeError("the normal-token model is not fitted; fit it on normal studies first")
        raw, calib = self._scored(out, context)
        q50, q99 = calib[:, 0].view(-1, 1, 1, 1, 1), calib[:, 1].view(-1, 1, 1, 1, 1)
        scale = ((q99 - q50) / 4.0).clamp_min(1e-6)
        amap = torch.sigmoid((raw - q99) / scale)
        shape = image.shape[2:] if image is not None else [g * 8 for g in out.grid]
        return upsample_to(amap, shape, 8).clamp(0, 1)

    def anomaly_map(self, out, image: torch.Tensor, context: Sequence[Any] | None = None) -> torch.Tensor:
        return self.forward(out, image=image, context=context)


def build_anomaly_head(cfg: AnomalyConfig) -> nn.Module:
    """The supervised decoder or the unsupervised normal-token model, by ``cfg.mode``.

    >>> build_anomaly_head(AnomalyConfig(task="anomaly", embed_dim=64, labels=["anomaly"], mode="unsupervised"))
    """
    return SupervisedAnomalyHead(cfg) if cfg.mode == "supervised" else NormalTokenModel(cfg)
