"""The from-scratch baseline for segmentation heads: MONAI SegResNet on the same split, same views,
same targets and the same wall-clock budget as the head's training run.

The comparison that matters is time: how long each needs to reach the baseline's final Dice. Both
learning curves are validation Dice against wall-clock seconds (the head's clock includes computing
its frozen features).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import PreparedCache
from decipher_mr.heads.dense import centre_view

from . import head_metrics as M


def train_segresnet_baseline(cache: PreparedCache, train_idx: Sequence[int], val_idx: Sequence[int], targets,
                             crop: Sequence[int], budget_s: float, eval_every_s: float | None = None,
                             lr: float = 3e-3, seed: int = 0, init_filters: int = 8) -> dict[str, Any]:
    """Train SegResNet from scratch for ``budget_s`` seconds; returns its Dice curve and final Dice.

    ``targets`` is the head's :class:`~decipher_mr.train.head_targets.TaskTargets` (same labels).

    >>> base = train_segresnet_baseline(cache, train, val, targets, (48, 56, 48), budget_s=60)
    >>> base["final_dice"], base["history"][-1]["elapsed_s"]
    """
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = len(targets.labels)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=k, init_filters=init_filters)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)

    def view(i: int) -> tuple[torch.Tensor, np.ndarray]:
        x = centre_view(np.asarray(cache.load(i), dtype=np.float32), crop)[0]
        return torch.from_numpy(x)[None, None], targets._label_view(i)

    train = [view(i) for i in train_idx]
    val = [view(i) for i in val_idx]
    # SegResNet downsamples three times: pad views up to a multiple of 8.
    pad = [(-c) % 8 for c in crop]

    def forward(x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else x
        return net(xp)[..., : crop[0], : crop[1], : crop[2]]

    def validate() -> float:
        net.eval()
        with torch.no_grad():
            d = [M.mean_ignoring_nan(M.dice_hd95(forward(x)[0].argmax(0).numpy(), y, k)["dice"]) for x, y in val if y.any()]
        net.train()
        return M.mean_ignoring_nan(d)

    every = eval_every_s or max(budget_s / 8, 1.0)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    next_eval, it = every, 0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            break
        x, y = train[int(rng.integers(len(train)))]
        logits = forward(x)
        truth = torch.from_numpy(y.astype(np.int64))[None]
        probs = logits.softmax(1)
        onehot = F.one_hot(truth, k).permute(0, 4, 1, 2, 3).float()
        dice = 1 - (2 * (probs * onehot).sum((2, 3, 4)) + 1) / (probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4)) + 1)
        loss = F.cross_entropy(logits, truth) + dice[:, 1:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if time.perf_counter() - t0 >= next_eval:
            history.append({"iteration": it, "elapsed_s": time.perf_counter() - t0, "dice": validate()})
            next_eval += every
    history.append({"iteration": it, "elapsed_s": time.perf_counter() - t0, "dice": validate()})
    return {"model": "monai SegResNet (from scratch)", "budget_s": budget_s, "iterations": it,
            "final_dice": history[-1]["dice"], "history": history}


def time_to_reach(history: Sequence[dict[str, Any]], key: str, level: float) -> float | None:
    """First elapsed time at which ``history[key] >= level`` (``None`` if never).

    >>> time_to_reach([{"elapsed_s": 1, "dice": 0.2}, {"elapsed_s": 2, "dice": 0.5}], "dice", 0.4)
    2
    """
    for h in history:
        v = h.get(key)
        if v is not None and not np.isnan(v) and v >= level:
            return h["elapsed_s"]
    return None
