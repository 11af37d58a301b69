"""Multi-crop views of prepared MRI volumes: 2 global + N local crops, MRI intensity augmentation.

Every random choice of a sample comes from its own generator seeded by ``(seed, sample key)``,
where the key is the sample's position in the global data stream (see
``ResumableDistributedSampler(with_keys=True)``). A sample therefore looks the same whatever the
number of processes or DataLoader workers and after a resume, which is what makes resumed and
multi-process runs reproduce single-process ones.

Crop geometry: each crop covers a random fraction of the volume, drawn separately in-plane (area
fraction of the i-j plane, as in DINO) and through-plane (fraction of k, since MRI slices are
thick), then is area-resized to the crop size. A crop never upsamples: where the drawn extent is
smaller than the crop size the native voxels are kept, and where the volume itself is smaller than
the crop it is padded with its minimum value (the background after normalisation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import PreparedCache
from decipher_mr.train.ssl.masking import BlockMaskConfig, kept_crops, masked_crop_count, sample_masks


@dataclass
class MultiCropConfig:
    """Sizes, scale ranges and augmentation strengths (defaults follow the paper's 256x256x24 crops)."""

    global_size: tuple[int, int, int] = (256, 256, 24)
    local_size: tuple[int, int, int] = (128, 128, 16)
    n_local: int = 8
    global_scale_inplane: tuple[float, float] = (0.4, 1.0)
    global_scale_through: tuple[float, float] = (0.5, 1.0)
    local_scale_inplane: tuple[float, float] = (0.05, 0.4)
    local_scale_through: tuple[float, float] = (0.2, 0.5)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5  # along i (left-right): brains are nearly symmetric
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_probability: float = 0.8
    contrast: tuple[float, float] = (0.75, 1.25)
    contrast_probability: float = 0.8
    bias_field_coefficient: float = 0.3
    bias_field_probability: float = 0.5
    noise_std: float = 0.05
    noise_probability: float = 0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiCropConfig":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown crop options {sorted(bad)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def sample_box(shape: tuple[int, ...], size: tuple[int, int, int], inplane: tuple[float, float],
               through: tuple[float, float], aspect: tuple[float, float], rng: np.random.Generator) -> tuple[slice, ...]:
    """Slices of a random crop of ``shape`` covering the drawn fractions (at least ``size`` voxels
    where the volume has them, so the crop is only ever downsampled).

    >>> sample_box((181, 217, 181), (64, 64, 16), (0.4, 1), (0.5, 1), (0.75, 1.33), np.random.default_rng(0))
    """
    area = rng.uniform(*inplane)
    ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    fractions = (min(1.0, math.sqrt(area * ar)), min(1.0, math.sqrt(area / ar)), rng.uniform(*through))
    slices = []
    for n, c, f in zip(shape, size, fractions):
        extent = min(n, max(int(round(f * n)), c))
        start = int(rng.integers(0, n - extent + 1))
        slices.append(slice(start, start + extent))
    return tuple(slices)


def crop_resized(volume: np.ndarray, box: tuple[slice, ...], size: tuple[int, int, int]) -> torch.Tensor:
    """The (1, X, Y, Z) float32 crop, area-downsampled to ``size`` and padded where the volume is smaller."""
    # A copy: the cache is memory-mapped read-only and the crop must be writable (and own its memory).
    region = torch.from_numpy(np.array(volume[box], dtype=np.float32, copy=True))
    out = tuple(min(e, c) for e, c in zip(region.shape, size))
    if tuple(region.shape) != out:
        region = F.adaptive_avg_pool3d(region[None, None], out)[0, 0]
    pad = [c - o for c, o in zip(size, out)]
    if any(pad):
        fill = float(region.min()) if region.numel() else 0.0
        lo = [p // 2 for p in pad]
        region = F.pad(region, (lo[2], pad[2] - lo[2], lo[1], pad[1] - lo[1], lo[0], pad[0] - lo[0]), value=fill)
    return region[None]


def augment_intensity(x: torch.Tensor, cfg: MultiCropConfig, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """MRI-style intensity changes: smooth multiplicative bias field, gamma, contrast, Rician-like noise.

    ``strength`` in [0, 1] scales the probabilities (DINO's second global view is augmented less).
    """
    lo, hi = float(x.min()), float(x.max())
    span = max(hi - lo, 1e-6)
    if rng.random() < cfg.bias_field_probability * strength:
        # A low-order smooth field: random values on a 3x3x2 lattice upsampled to the crop.
        coarse = torch.from_numpy(rng.normal(0.0, cfg.bias_field_coefficient, size=(1, 1, 3, 3, 2)).astype(np.float32))
        field = F.interpolate(coarse, size=tuple(x.shape[1:]), mode="trilinear", align_corners=True)[0]
        x = lo + (x - lo) * torch.exp(field)
    if rng.random() < cfg.gamma_probability * strength:
        g = float(math.exp(rng.uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))))
        x = lo + span * ((x - lo) / span).clamp(0, None).pow(g)
    if rng.random() < cfg.contrast_probability * strength:
        c = float(rng.uniform(*cfg.contrast))
        m = x.mean()
        x = m + (x - m) * c
    if rng.random() < cfg.noise_probability * strength:
        std = float(rng.uniform(0, cfg.noise_std)) * span
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        x = x + std * torch.randn(x.shape, generator=gen)
    return x


class MultiCropDataset(torch.utils.data.Dataset):
    """Multi-crop views of the cache's items; indexed by ``(item index, sample key)`` pairs.

    >>> ds = MultiCropDataset(PreparedCache("demo/cache"), cfg=MultiCropConfig(global_size=(64, 64, 16)))
    >>> views = ds[(0, 12345)]      # global (2,1,X,Y,Z), local (n,1,...), masks (2, N)
    """

    def __init__(self, cache: PreparedCache, indices: list[int] | None = None, cfg: MultiCropConfig | None = None,
                 mask_cfg: BlockMaskConfig | None = None, patch_size: tuple[int, int, int] = (8, 8, 8), seed: int = 0):
        self.cache = cache
        self.indices = list(range(len(cache))) if indices is None else list(indices)
        if not self.indices:
            raise ValueError(f"{cache.root}: no items to train on (check the split / body_region selection)")
        self.cfg = cfg or MultiCropConfig()
        self.mask_cfg = mask_cfg or BlockMaskConfig()
        self.grid = tuple(-(-s // p) for s, p in zip(self.cfg.global_size, patch_size))
        self.seed = seed
        self.bad_items: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index_and_key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        if isinstance(index_and_key, tuple):
            index, key = index_and_key
        else:
            index, key = index_and_key, index_and_key
        rng = np.random.default_rng([self.seed, int(key)])
        volume = None
        # A bad item must not stop a long run: warn (naming the file) and use the next item instead.
        for attempt in range(len(self.indices)):
            item = self.indices[(index + attempt) % len(self.indices)]
            try:
                volume = self._load(item)
                break
            except RuntimeError as exc:
                if item not in self.bad_items:
                    self.bad_items.add(item)
                    warnings.warn(f"skipping a bad training item: {exc}", RuntimeWarning, stacklevel=2)
        if volume is None:
            raise RuntimeError(f"{self.cache.root}: none of the {len(self.indices)} selected items could be read")
        c = self.cfg
        views = []
        for v, strength in ((0, 1.0), (1, 0.5)):
            box = sample_box(volume.shape, c.global_size, c.global_scale_inplane, c.global_scale_through, c.aspect, rng)
            views.append(self._augment(crop_resized(volume, box, c.global_size), rng, strength))
        local = []
        for _ in range(c.n_local):
            box = sample_box(volume.shape, c.local_size, c.local_scale_inplane, c.local_scale_through, c.aspect, rng)
            local.append(self._augment(crop_resized(volume, box, c.local_size), rng, 1.0))
        masks, slots = sample_masks(int(key), self.grid, rng, self.mask_cfg)
        return {
            "global": torch.stack(views),
            "local": torch.stack(local) if local else torch.zeros((0, 1, *c.local_size)),
            # Candidate masks; the collate keeps those of the batch's first-ranked crops.
            "masks": torch.from_numpy(masks),
            "mask_slots": torch.from_numpy(slots),
            "mask_fraction": torch.tensor(float(self.mask_cfg.sample_probability), dtype=torch.float64),
            "key": torch.tensor(int(key)),
        }

    def _load(self, item: int) -> np.ndarray:
        path = self.cache.root / self.cache.items[item].array
        try:
            volume = self.cache.load(item)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{path}: cannot read the prepared array ({exc})") from exc
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise RuntimeError(f"{path}: expected a non-empty 3D array, got shape {volume.shape}")
        if not np.isfinite(volume[:: max(1, volume.shape[0] // 8)]).all():
            raise RuntimeError(f"{path}: the prepared array holds NaN or infinite values")
        return volume

    def _augment(self, x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
        if rng.random() < self.cfg.flip_probability:
            x = x.flip(1)
        return augment_intensity(x, self.cfg, rng, strength).contiguous()


def collate_multicrop(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch views crop-major: global (2B, 1, ...) = [view 0 of every sample, view 1 of every sample],
    local (nB, 1, ...) likewise, masks (2B, N) aligned with the global crops.

    Exactly ``int(2B * sample_probability)`` global crops keep their masks (DINOv2's fixed count):
    those ranked first by ``slot * B + position`` (see :mod:`decipher_mr.train.ssl.masking`), which
    masks the same crops of the global batch whatever the number of processes.
    """
    n_masked = masked_crop_count(len(samples), float(samples[0]["mask_fraction"]))
    keep = torch.from_numpy(kept_crops(torch.stack([s["mask_slots"] for s in samples]).numpy(), n_masked))  # (B, 2)
    masks = torch.stack([s["masks"] for s in samples]) & keep[..., None]  # (B, 2, N)
    return {
        "global": torch.stack([s["global"] for s in samples], 1).flatten(0, 1),
        "local": torch.stack([s["local"] for s in samples], 1).flatten(0, 1),
        "masks": masks.transpose(0, 1).flatten(0, 1),
        "keys": torch.stack([s["key"] for s in samples]),
    }
