"""3D block masking for iBOT: random boxes of patches on the (gx, gy, gz) grid.

Boxes rather than scattered patches, because a masked patch whose neighbours are all visible is
trivially inpainted. MRI grids are flat (few patches through-plane), so a box's in-plane aspect
and its through-plane depth are drawn separately.

Which crops are masked (as DINOv2's ``collate_data_and_cast``): a fixed number of the batch's global
crops, ``int(2 * B * sample_probability)``, so that every batch -- and every rank's share of one --
has masked patches. The choice is made so that the global batch's masks are the same for any number
of processes and after a resume:

* every sample ranks its two views in random order (its own generator, seeded by its stream key);
  the batch's crops are ranked slot-major, ``slot * B + position``, and the first ``n`` are masked.
  The sampler deals the global batch out to ranks round-robin, so the first ``n / W`` of each of
  ``W`` ranks are together the first ``n`` of the global batch (equal when ``2 * B_rank * p`` is
  an integer);
* a crop's ratio depends only on its sample's stream key and its slot: ``lo + (hi - lo) *
  frac(key * (sqrt(5) - 1) / 2 + slot / 2)``. DINOv2 spreads the ratios with a ``linspace`` over the
  masked crops of a rank's batch, which changes them with the number of processes; this golden-ratio
  sequence spreads the ratios of any run of consecutive keys (the masked crops of a global batch)
  almost as evenly: by the three-gap theorem, neighbouring ratios of ``m`` consecutive keys are at
  most ``1.9 (hi - lo) / m`` apart. A rank's share (every ``W``-th key) is spread less evenly for
  some ``W``; the loss is a mean over the global batch, whose spread is what counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class BlockMaskConfig:
    """How many global-crop samples are masked and how much of each.

    ``ratio`` is the range of the fraction of patches masked in a masked crop;
    ``sample_probability`` the fraction of a batch's global crops that are masked (a fixed count,
    ``int(2 * B * sample_probability)``, as DINOv2's ``mask_probability``).
    """

    ratio: tuple[float, float] = (0.1, 0.5)
    sample_probability: float = 0.5
    min_box_patches: int = 4
    aspect: tuple[float, float] = (0.3, 1 / 0.3)


def block_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator, cfg: BlockMaskConfig | None = None) -> np.ndarray:
    """A flat bool mask (gx*gy*gz, C order) with about ``ratio`` of the patches in random boxes.

    >>> m = block_mask((8, 8, 2), 0.3, np.random.default_rng(0))
    >>> m.shape, bool(0.2 < m.mean() < 0.4)
    ((128,), True)
    """
    cfg = cfg or BlockMaskConfig()
    gx, gy, gz = grid
    n = gx * gy * gz
    target = int(round(ratio * n))
    mask = np.zeros(grid, dtype=bool)
    count = 0
    failures = 0
    while count < target and failures < 20:
        remaining = target - count
        volume = rng.uniform(min(cfg.min_box_patches, remaining), remaining)
        bz = int(rng.integers(1, gz + 1))
        area = volume / bz
        aspect = math.exp(rng.uniform(math.log(cfg.aspect[0]), math.log(cfg.aspect[1])))
        bx = int(round(math.sqrt(area * aspect)))
        by = int(round(math.sqrt(area / aspect)))
        if not (1 <= bx <= gx and 1 <= by <= gy):
            failures += 1
            continue
        x0 = int(rng.integers(0, gx - bx + 1))
        y0 = int(rng.integers(0, gy - by + 1))
        z0 = int(rng.integers(0, gz - bz + 1))
        box = mask[x0 : x0 + bx, y0 : y0 + by, z0 : z0 + bz]
        added = int((~box).sum())
        if added == 0 or count + added > target + max(1, target // 10):
            failures += 1
            continue
        box[...] = True
        count += added
    if count < target:
        # Boxes could not tile the rest (tiny grids): top up with single patches for a stable ratio.
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=target - count, replace=False)] = True
    return mask.ravel()


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def mask_ratio(key: int, slot: int, cfg: BlockMaskConfig | None = None) -> float:
    """The masking ratio of the crop in mask slot ``slot`` (0 or 1) of the sample with stream ``key``.

    >>> [round(mask_ratio(k, 0, BlockMaskConfig(ratio=(0.0, 1.0))), 3) for k in range(4)]
    [0.0, 0.618, 0.236, 0.854]
    """
    lo, hi = (cfg or BlockMaskConfig()).ratio
    u = (int(key) * GOLDEN + 0.5 * slot) % 1.0
    return float(lo + (hi - lo) * u)


def masked_crop_count(batch_size: int, sample_probability: float, n_views: int = 2) -> int:
    """How many of a batch's ``n_views * batch_size`` global crops are masked (DINOv2's
    ``int(B * mask_probability)``; the small tolerance keeps e.g. ``0.3 * 10`` at 3)."""
    return max(0, min(n_views * batch_size, int(math.floor(n_views * batch_size * sample_probability + 1e-9))))


def sample_masks(key: int, grid: tuple[int, int, int], rng: np.random.Generator,
                 cfg: BlockMaskConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One sample's candidate masks ``(2, N)`` (per view) and each view's mask slot ``(2,)``.

    The collate keeps the masks of the crops ranked first in the batch (see the module doc) and
    clears the others. A slot-1 mask is only drawn when it can be used (``sample_probability > 0.5``).

    >>> masks, slots = sample_masks(17, (8, 8, 2), np.random.default_rng(0))
    """
    cfg = cfg or BlockMaskConfig()
    n = grid[0] * grid[1] * grid[2]
    first = int(rng.integers(0, 2))  # the view in slot 0
    slots = np.array([0, 1] if first == 0 else [1, 0], dtype=np.int64)
    out = np.zeros((2, n), dtype=bool)
    used = (cfg.sample_probability > 0) + (cfg.sample_probability > 0.5)
    for slot in range(used):
        view = int(np.flatnonzero(slots == slot)[0])
        out[view] = block_mask(grid, mask_ratio(key, slot, cfg), rng, cfg)
    return out, slots


def kept_crops(slots: np.ndarray, n_masked: int) -> np.ndarray:
    """(B, 2) bool: which crops of a batch keep their mask, given each sample's view slots (B, 2):
    the ``n_masked`` ranked first by ``slot * B + position``.

    >>> kept_crops(np.array([[0, 1], [1, 0], [0, 1]]), 3)
    array([[ True, False],
           [False,  True],
           [ True, False]])
    """
    slots = np.asarray(slots)
    return (slots * slots.shape[0] + np.arange(slots.shape[0])[:, None]) < n_masked
