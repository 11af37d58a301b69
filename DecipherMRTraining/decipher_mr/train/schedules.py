"""Per-iteration schedules and optimizer parameter groups, shared by every training stage.

Bookkeeping is by iteration, not epoch: every schedule is a NumPy array with one value per
iteration, computed once before training. Resuming at iteration ``t`` then just reads ``array[t]``;
there is no scheduler object whose hidden state could drift from the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch


def cosine_schedule(
    base: float,
    final: float,
    iterations: int,
    warmup_iterations: int = 0,
    warmup_start: float = 0.0,
    freeze_iterations: int = 0,
) -> np.ndarray:
    """One value per iteration: ``freeze`` at 0, linear warm-up to ``base``, cosine decay to ``final``.

    >>> lr = cosine_schedule(1e-3, 1e-6, iterations=1000, warmup_iterations=100)
    >>> float(lr[100]), len(lr)
    (0.001, 1000)
    """
    if iterations <= 0:
        raise ValueError(f"schedule length must be positive, got {iterations}")
    freeze = np.zeros(min(freeze_iterations, iterations))
    warm_n = min(warmup_iterations, iterations - len(freeze))
    warm = np.linspace(warmup_start, base, warm_n, endpoint=False) if warm_n > 0 else np.zeros(0)
    rest = iterations - len(freeze) - warm_n
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    out = np.concatenate([freeze, warm, cos]).astype(np.float64)
    assert len(out) == iterations
    return out


def linear_warmup_then_constant(value: float, iterations: int, warmup_iterations: int, warmup_start: float) -> np.ndarray:
    """Linear ramp from ``warmup_start`` to ``value`` then flat (DINO's teacher-temperature warm-up).

    >>> t = linear_warmup_then_constant(0.07, 100, 30, 0.04)
    >>> round(float(t[0]), 3), round(float(t[-1]), 3)
    (0.04, 0.07)
    """
    warm_n = min(warmup_iterations, iterations)
    warm = np.linspace(warmup_start, value, warm_n) if warm_n > 0 else np.zeros(0)
    return np.concatenate([warm, np.full(iterations - warm_n, value)]).astype(np.float64)


@dataclass
class TrainingSchedules:
    """The arrays a stage indexes by iteration; any may be ``None`` if the stage has no use for it.

    >>> s = TrainingSchedules.build(iterations=100, lr=1e-3, warmup_iterations=10)
    >>> s.at(50)["lr"] > 0
    True
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray | None = None  # EMA teacher momentum
    teacher_temp: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        iterations: int,
        lr: float,
        min_lr: float = 1e-6,
        warmup_iterations: int = 0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = None,
        momentum: float | None = None,
        momentum_end: float = 1.0,
        teacher_temp: float | None = None,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_iterations: int = 0,
    ) -> "TrainingSchedules":
        return cls(
            lr=cosine_schedule(lr, min_lr, iterations, warmup_iterations),
            weight_decay=cosine_schedule(weight_decay, weight_decay if weight_decay_end is None else weight_decay_end, iterations),
            momentum=None if momentum is None else cosine_schedule(momentum, momentum_end, iterations),
            teacher_temp=None
            if teacher_temp is None
            else linear_warmup_then_constant(teacher_temp, iterations, teacher_temp_warmup_iterations, warmup_teacher_temp),
        )

    def at(self, iteration: int) -> dict[str, float]:
        """Every schedule's value at ``iteration`` (clamped to the last one past the end)."""
        out = {}
        for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
            arr = getattr(self, name)
            if arr is not None:
                out[name] = float(arr[min(iteration, len(arr) - 1)])
        return out


def apply_to_optimizer(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set lr and weight decay on every group, honouring each group's ``lr_scale`` and ``wd_scale``.

    >>> apply_to_optimizer(opt, **{k: v for k, v in schedules.at(it).items() if k in ("lr", "weight_decay")})
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id_for_parameter(name: str, num_layers: int) -> int:
    """Depth of a transformer parameter: 0 for embeddings/tokens, i+1 for block i, num_layers+1 after.

    >>> layer_id_for_parameter("backbone.blocks.3.attn.qkv.weight", 12)
    4
    """
    m = _BLOCK_INDEX.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(key in name for key in ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")):
        return 0
    return num_layers + 1


def layerwise_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    num_layers: int,
    layer_decay: float = 1.0,
    extra_lr_scale: dict[str, float] | None = None,
) -> list[dict]:
    """Optimizer groups with layer-wise lr decay and no weight decay on biases, norms and tokens.

    Each group carries ``lr_scale`` and ``wd_scale`` that :func:`apply_to_optimizer` multiplies in.
    ``extra_lr_scale`` maps a name prefix (e.g. ``"dino_head."``) to an extra factor.

    >>> groups = layerwise_param_groups(model.named_parameters(), num_layers=12, layer_decay=0.9)
    >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        no_wd = param.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name or "gamma" in name
        lr_scale = layer_decay ** (num_layers + 1 - layer_id_for_parameter(name, num_layers))
        for prefix, factor in (extra_lr_scale or {}).items():
            if name.startswith(prefix):
                lr_scale *= factor
        wd_scale = 0.0 if no_wd else 1.0
        key = (round(lr_scale, 12), wd_scale)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": lr_scale, "wd_scale": wd_scale})
        group["params"].append(param)
        group["names"].append(name)
    # Stable order (by the first parameter's position) keeps optimizer state indices reproducible.
    return list(groups.values())

