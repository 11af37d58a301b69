"""What a training run shows while it runs: a progress bar, TensorBoard scalars, collapse warnings.

Only the main rank draws the bar and writes event files; other ranks get a silent monitor, so a
stage calls the same methods everywhere. Collapse monitors are plain functions of tensors, usable
for any embedding (class tokens in stage 1, image/text projections in alignment).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Mapping

import torch


@torch.no_grad()
def mean_entropy(probs: torch.Tensor) -> float:
    """Mean Shannon entropy (nats) of the rows of a probability matrix (B, K).

    A teacher collapsed onto one prototype has entropy near 0; a uniform one (another collapse)
    has ``log K``.

    >>> mean_entropy(torch.full((4, 8), 1 / 8))   # == log(8)
    2.0794...
    """
    p = probs.float().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


@torch.no_grad()
def effective_rank(embeddings: torch.Tensor) -> float:
    """Effective rank (exp of the entropy of normalised singular values, Roy & Vetterli 2007).

    Near 1 means every sample maps to nearly the same direction (representation collapse).

    >>> effective_rank(torch.randn(64, 16))       # close to 16
    """
    x = embeddings.float()
    x = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class CollapseWatch:
    """Warn (once per kind, then every ``every`` calls) when monitors cross collapse thresholds.

    >>> watch = CollapseWatch(num_prototypes=4096)
    >>> watch.check(step=100, teacher_entropy=0.01, effective_rank=1.2)   # -> list of warnings
    """

    def __init__(self, num_prototypes: int | None = None, min_entropy_frac: float = 0.02,
                 max_entropy_frac: float = 0.995, min_rank: float = 1.5, every: int = 100):
        self.max_entropy = math.log(num_prototypes) if num_prototypes else None
        self.min_entropy_frac, self.max_entropy_frac = min_entropy_frac, max_entropy_frac
        self.min_rank, self.every = min_rank, every
        self._last: dict[str, int] = {}

    def check(self, step: int, teacher_entropy: float | None = None, effective_rank: float | None = None) -> list[str]:
        found = []
        if teacher_entropy is not None and self.max_entropy:
            frac = teacher_entropy / self.max_entropy
            if frac < self.min_entropy_frac:
                found.append(("entropy-low", f"teacher entropy {teacher_entropy:.3f} nats is near 0: outputs collapsed onto few prototypes"))
            elif frac > self.max_entropy_frac:
                found.append(("entropy-high", f"teacher entropy {teacher_entropy:.3f} is near log K: outputs are uniform (collapse)"))
        if effective_rank is not None and not math.isnan(effective_rank) and effective_rank < self.min_rank:
            found.append(("rank", f"effective rank of embeddings {effective_rank:.2f}: representations collapsed"))
        out = []
        for kind, msg in found:
            last = self._last.get(kind)
            if last is None or step - last >= self.every:
                self._last[kind] = step
                out.append(f"step {step}: possible collapse: {msg}")
                warnings.warn(out[-1], RuntimeWarning, stacklevel=2)
        return out


class TrainingMonitor:
    """tqdm progress bar (stderr) + TensorBoard event files in ``run_dir/tensorboard``.

    >>> mon = TrainingMonitor("runs/a", total=1000, start=0, enabled=ctx.is_main, desc="pretrain-vision")
    >>> mon.step(it, {"loss": 3.2, "lr": 1e-4}, samples=8)     # once per iteration
    >>> mon.close()
    """

    def __init__(self, run_dir: str | Path, total: int, start: int = 0, enabled: bool = True,
                 desc: str = "train", log_every: int = 1, tensorboard: bool = True):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.bar = None
        self.writer = None
        self._t0 = time.perf_counter()
        self._samples = 0
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        smoothing=0.1, unit="it")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start or None)

    def step(self, iteration: int, metrics: Mapping[str, float], samples: int = 0, advance: int = 1) -> None:
        """Advance the bar and log ``metrics`` as scalars at ``iteration``; throughput goes in too."""
        if not self.enabled:
            return
        self._samples += samples
        elapsed = time.perf_counter() - self._t0
        rate = self._samples / elapsed if elapsed > 0 else 0.0
        if self.writer is not None and iteration % self.log_every == 0:
            for k, v in metrics.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.writer.add_scalar(k, float(v), iteration)
            if samples:
                self.writer.add_scalar("throughput/samples_per_s", rate, iteration)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr") or k.startswith("loss/")}
            if samples:
                shown["vol/s"] = f"{rate:.2f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(advance)

    def text(self, tag: str, message: str, iteration: int) -> None:
        """Record a note (e.g. a collapse warning) in TensorBoard and above the bar."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_text(tag, message, iteration)
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
