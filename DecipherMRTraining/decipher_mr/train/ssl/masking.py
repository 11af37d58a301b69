"""3D block masking for iBOT: random boxes of patches on the (gx, gy, gz) grid.

Boxes rather than scattered patches, because a masked patch whose neighbours are all visible is
trivially inpainted. MRI grids are flat (few patches through-plane), so a box's in-plane aspect
and its through-plane depth are drawn separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class BlockMaskConfig:
    """How many global-crop samples are masked and how much of each.

    ``ratio`` is the range of the fraction of patches masked in a masked sample;
    ``sample_probability`` the chance that a sample is masked at all.
    """

    ratio: tuple[float, float] = (0.1, 0.5)
    sample_probability: float = 0.5
    min_box_patches: int = 4
    aspect: tuple[float, float] = (0.3, 1 / 0.3)


def block_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator, cfg: BlockMaskConfig | None = None) -> np.ndarray:
    """A flat bool mask (gx*gy*gz, C order) with about ``ratio`` of the patches in random boxes.

    >>> m = block_mask((8, 8, 2), 0.3, np.random.default_rng(0))
    >>> m.shape, 0.2 < m.mean() < 0.4
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


def sample_masks(num: int, grid: tuple[int, int, int], rng: np.random.Generator, cfg: BlockMaskConfig | None = None) -> np.ndarray:
    """(num, N) masks: each sample is masked with ``sample_probability`` at a ratio drawn in ``ratio``.

    >>> masks = sample_masks(2, (8, 8, 2), np.random.default_rng(0))
    """
    cfg = cfg or BlockMaskConfig()
    n = grid[0] * grid[1] * grid[2]
    out = np.zeros((num, n), dtype=bool)
    for i in range(num):
        if rng.random() < cfg.sample_probability:
            out[i] = block_mask(grid, float(rng.uniform(*cfg.ratio)), rng, cfg)
    return out
