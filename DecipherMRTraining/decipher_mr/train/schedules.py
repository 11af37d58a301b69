"""Per-iteration schedules and optimizer parameter groups, shared by every training stage.

Bookkeeping is by iteration, not epoch: every schedule is a NumPy array with one value per
iteration, computed once before training. Resuming at iteration ``t`` then just reads ``array[t]``;
there is no scheduler object whose hidden state could drift from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

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

