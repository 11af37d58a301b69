"""Multi-crop views of prepared MRI volumes: 2 global + N local crops, MRI intensity augmentation.

Every random choice of a sample comes from its own generator seeded by ``(seed, sample key)``,
where the key is the sample's position in the global data stream (see
``ResumableDistributedSampler(with_keys=True)``). A sample therefore looks the same whatever the
number of processes or DataLoader workers and after a resume, which is what makes resumed and
multi-process runs reproduce single-process ones.

Crop geometry (physical, from the voxel spacing)
------------------------------------------------
* The **slice axis** is the axis with the thickest voxels (:func:`slice_axis`; ``k`` when the
  spacing is near-isotropic). It becomes the crop's last, short axis: an axial series is cropped
  as ``(i, j, k)``, a coronal one as ``(i, k, j)``, a sagittal one as ``(j, k, i)``.
* Extents are in **millimetres**: at scale 1 a global crop covers ``global_mm`` (in-plane,
  in-plane, through-plane); a crop draws an in-plane *area* fraction of that (DINOv2's 0.32–1.0
  for global, 0.05–0.32 for local crops, with a 3/4–4/3 aspect jitter) and a through-plane fraction.
  In-plane pixels of the output are therefore square (up to the aspect jitter) whatever the
  series' spacing: nothing is squeezed along the wrong axis.
* Through-plane the crop never reaches beyond the series (a thin slab gives a thinner crop, not
  empty slices). In-plane a crop larger than the series in both directions shrinks, keeping its
  aspect ratio, until it fits one of them; the rest is padded with the minimum (the background).
* The box is then **resampled** to the configured output grid (``global_size``/``local_size``,
  short axis last): area-averaged by the integer part of the downsampling factor, then trilinear.
  Upsampling is allowed (thick slices, small local crops).

:func:`global_view` is the deterministic centred scale-1 global crop: the view stage 2, evaluation
and inference should feed the encoder so that it sees what stage 1 trained it on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import PreparedCache
from decipher_mr.train.ssl.masking import BlockMaskConfig, kept_crops, masked_crop_count, sample_masks


DEFAULT_GLOBAL_MM = (176.0, 176.0, 128.0)
SLICE_AXIS_RATIO = 1.25  # slices this much thicker than the finest axis define the slice axis


@dataclass
class MultiCropConfig:
    """Sizes, physical extents, scale ranges and augmentation strengths.

    ``global_size``/``local_size`` are the output grids (the paper's 256x256x24 and 128x128x16,
    short axis last); ``global_mm``/``local_mm`` the (in-plane, in-plane, through-plane) extents in
    mm at scale 1. ``*_scale_inplane`` are area fractions of the in-plane extent (DINOv2's ranges),
    ``*_scale_through`` fractions of the through-plane extent. The default 176 x 176 x 128 mm keeps
    a centred global crop of an adult head mostly head (about 75%) and covers the brain in-plane.
    """

    global_size: tuple[int, int, int] = (256, 256, 24)
    local_size: tuple[int, int, int] = (128, 128, 16)
    n_local: int = 8
    global_mm: tuple[float, float, float] = DEFAULT_GLOBAL_MM
    local_mm: tuple[float, float, float] = DEFAULT_GLOBAL_MM
    global_scale_inplane: tuple[float, float] = (0.32, 1.0)
    global_scale_through: tuple[float, float] = (0.5, 1.0)
    local_scale_inplane: tuple[float, float] = (0.05, 0.32)
    local_scale_through: tuple[float, float] = (0.2, 0.5)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5  # along the patient's left-right axis (i): brains are nearly symmetric
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_probability: float = 0.8
    contrast: tuple[float, float] = (0.75, 1.25)
    contrast_probability: float = 0.8
    bias_field_coefficient: float = 0.3
    bias_field_probability: float = 0.5
    noise_std: float = 0.05
    noise_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("global_mm", "local_mm"):
            mm = tuple(float(v) for v in getattr(self, name))
            if len(mm) != 3 or min(mm) <= 0:
                raise ValueError(f"crops.{name} must be three positive extents in mm, got {getattr(self, name)}")
            setattr(self, name, mm)
        for name in ("global_scale_inplane", "global_scale_through", "local_scale_inplane", "local_scale_through"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crops.{name} must satisfy 0 < low <= high <= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiCropConfig":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown crop options {sorted(bad)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def slice_axis(spacing: Sequence[float], ratio: float = SLICE_AXIS_RATIO) -> int:
    """The through-plane axis of a series: the one with the thickest voxels when they are at least
    ``ratio`` times the finest spacing, else ``k`` (2) for near-isotropic volumes.

    >>> slice_axis((4.0, 0.5, 0.5)), slice_axis((0.5, 3.0, 0.5)), slice_axis((1.5, 1.5, 1.5))
    (0, 1, 2)
    """
    s = [float(v) for v in spacing]
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    thick = max(range(3), key=lambda a: (s[a], a))  # ties go to the later axis (k first)
    return thick if s[thick] >= ratio * min(s) else 2


def crop_axes(spacing: Sequence[float]) -> tuple[int, int, int]:
    """Array axes of a crop's (X, Y, Z): the two in-plane axes in order, then the slice axis."""
    z = slice_axis(spacing)
    return (*(a for a in range(3) if a != z), z)  # type: ignore[return-value]


@dataclass(frozen=True)
class CropBox:
    """A crop of an array: output axis ``t`` runs along array axis ``axes[t]`` from edge coordinate
    ``start[t]`` over ``extent[t]`` voxels (voxel ``v`` spans ``[v, v + 1)``; both may be
    fractional and reach outside the array, which is then padded)."""

    axes: tuple[int, int, int]
    start: tuple[float, float, float]
    extent: tuple[float, float, float]

    def extent_mm(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        return tuple(e * float(spacing[a]) for a, e in zip(self.axes, self.extent))  # type: ignore[return-value]


def _box_extents_mm(shape: Sequence[int], spacing: Sequence[float], axes: tuple[int, int, int],
                    width: float, height: float, depth: float) -> tuple[float, float, float]:
    """Clamp drawn mm extents to the series: never thicker than it, and in-plane shrunk (same factor
    on both axes) while it exceeds the series in both directions."""
    fov = [shape[a] * float(spacing[a]) for a in axes]
    if width > fov[0] and height > fov[1]:
        shrink = max(fov[0] / width, fov[1] / height)
        width, height = width * shrink, height * shrink
    return width, height, min(depth, fov[2])


def _place(shape: Sequence[int], spacing: Sequence[float], axes: tuple[int, int, int], mm: Sequence[float],
           rng: np.random.Generator | None) -> CropBox:
    starts, extents = [], []
    for a, e_mm in zip(axes, mm):
        n, e = shape[a], e_mm / float(spacing[a])
        lo, hi = min(0.0, n - e), max(0.0, n - e)
        starts.append(float(rng.uniform(lo, hi)) if rng is not None else (n - e) / 2)
        extents.append(float(e))
    return CropBox(axes, tuple(starts), tuple(extents))  # type: ignore[arg-type]


def sample_box(shape: Sequence[int], spacing: Sequence[float], mm: Sequence[float], inplane: tuple[float, float],
               through: tuple[float, float], aspect: tuple[float, float], rng: np.random.Generator) -> CropBox:
    """A random crop of a ``shape`` array with voxel ``spacing``: an in-plane area fraction drawn
    from ``inplane`` of ``mm[:2]`` (aspect ratio from ``aspect``), a through-plane fraction from
    ``through`` of ``mm[2]``, at a uniform position.

    >>> sample_box((20, 512, 512), (4, .5, .5), (176, 176, 128), (.32, 1), (.5, 1), (.75, 1.33), rng).axes
    (1, 2, 0)
    """
    axes = crop_axes(spacing)
    area = rng.uniform(*inplane)
    ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    depth = float(mm[2]) * rng.uniform(*through)
    extents = _box_extents_mm(shape, spacing, axes, float(mm[0]) * math.sqrt(area * ar), float(mm[1]) * math.sqrt(area / ar), depth)
    return _place(shape, spacing, axes, extents, rng)


def centred_box(shape: Sequence[int], spacing: Sequence[float], mm: Sequence[float] = DEFAULT_GLOBAL_MM) -> CropBox:
    """The scale-1 crop (``mm``, aspect 1) centred on the array: a stage-1 global crop without the dice."""
    axes = crop_axes(spacing)
    return _place(shape, spacing, axes, _box_extents_mm(shape, spacing, axes, *(float(v) for v in mm)), None)


def crop_resized(volume: np.ndarray, box: CropBox, size: Sequence[int]) -> torch.Tensor:
    """The (1, X, Y, Z) float32 crop ``box`` of ``volume`` resampled to ``size``: averaged over the
    integer part of each downsampling factor, then trilinear at the output voxel centres (so it may
    upsample). Outside the volume it is the minimum of the read region (the background)."""
    size = tuple(int(s) for s in size)
    shape = volume.shape
    pool, window = [], []
    for t, a in enumerate(box.axes):
        k = max(1, int(box.extent[t] / size[t]))
        lo = max(0, math.floor(box.start[t]) - k)
        hi = min(shape[a], math.ceil(box.start[t] + box.extent[t]) + k)
        if hi <= lo:  # the box lies outside the array along this axis: take its nearest edge
            lo, hi = (shape[a] - 1, shape[a]) if lo >= shape[a] else (0, 1)
        pool.append(k)
        window.append((lo, hi))
    index = [slice(None)] * 3
    for (lo, hi), a in zip(window, box.axes):
        index[a] = slice(lo, hi)
    # A copy: the cache is memory-mapped read-only and the crop must be writable (and own its memory).
    region = torch.from_numpy(np.array(volume[tuple(index)], dtype=np.float32, copy=True)).permute(*box.axes)
    fill = float(region.min())
    region = region[None, None]
    if max(pool) > 1:
        region = F.avg_pool3d(region, tuple(pool), tuple(pool), ceil_mode=True)
    coords, inside = [], []
    for t, a in enumerate(box.axes):
        # Edge coordinates of the output voxel centres, in the (pooled) window's normalised frame.
        c = box.start[t] + (torch.arange(size[t], dtype=torch.float64) + 0.5) * (box.extent[t] / size[t])
        inside.append((c >= 0) & (c <= shape[a]))
        coords.append((2 * (c - window[t][0]) / pool[t] / region.shape[2 + t] - 1).float())
    gx, gy, gz = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack((gz, gy, gx), dim=-1)[None]  # grid_sample's last dim is (W, H, D) = (Z, Y, X)
    out = F.grid_sample(region, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    if not bool(mask.all()):
        out = torch.where(mask, out, torch.tensor(fill, dtype=out.dtype))
    return out[None].contiguous()


def global_view(volume: np.ndarray, spacing: Sequence[float], size: Sequence[int],
                mm: Sequence[float] | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """The (X, Y, Z) float32 global view of a prepared volume: the geometry of a stage-1 global crop
    at scale 1 (``mm``, default :data:`DEFAULT_GLOBAL_MM`; slice axis last), centred, or at a
    uniformly drawn position when ``rng`` is given. Stage 2, evaluation and inference share it.

    >>> v = global_view(cache.load(0), cache.items[0].spacing, (256, 256, 24))
    """
    mm = DEFAULT_GLOBAL_MM if mm is None else tuple(float(v) for v in mm)
    axes = crop_axes(spacing)
    box = _place(volume.shape, spacing, axes, _box_extents_mm(volume.shape, spacing, axes, *mm), rng)
    return crop_resized(volume, box, size)[0].numpy()


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

    >>> ds = MultiCropDataset(PreparedCache("demo/cache"), cfg=MultiCropConfig(global_size=(64, 64, 16)))   # spacing from the index
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
        volume, spacing = None, (1.0, 1.0, 1.0)
        # A bad item must not stop a long run: warn (naming the file) and use the next item instead.
        for attempt in range(len(self.indices)):
            item = self.indices[(index + attempt) % len(self.indices)]
            try:
                volume, spacing = self._load(item), self.cache.items[item].spacing
                break
            except RuntimeError as exc:
                if item not in self.bad_items:
                    self.bad_items.add(item)
                    warnings.warn(f"skipping a bad training item: {exc}", RuntimeWarning, stacklevel=2)
        if volume is None:
            raise RuntimeError(f"{self.cache.root}: none of the {len(self.indices)} selected items could be read")
        c = self.cfg
        flip_dim = 1 + crop_axes(spacing).index(0)  # the crop's left-right axis (after the channel)
        views = []
        for v, strength in ((0, 1.0), (1, 0.5)):
            box = sample_box(volume.shape, spacing, c.global_mm, c.global_scale_inplane, c.global_scale_through, c.aspect, rng)
            views.append(self._augment(crop_resized(volume, box, c.global_size), rng, strength, flip_dim))
        local = []
        for _ in range(c.n_local):
            box = sample_box(volume.shape, spacing, c.local_mm, c.local_scale_inplane, c.local_scale_through, c.aspect, rng)
            local.append(self._augment(crop_resized(volume, box, c.local_size), rng, 1.0, flip_dim))
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

    def _augment(self, x: torch.Tensor, rng: np.random.Generator, strength: float, flip_dim: int = 1) -> torch.Tensor:
        if rng.random() < self.cfg.flip_probability:
            x = x.flip(flip_dim)
        return augment_intensity(x, self.cfg, rng, strength).contiguous()


def collate_multicrop(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch views crop-major: global (2B, 1, ...) = [view 0 of every sample, view 1 of every sample],
    local (nB, 1, ...) likewise, masks (2B, N) aligned with the global crops.

    Exactly ``int(2B * sample_probability)`` global crops keep their masks (DINOv2's fixed count):
    those ranked first by ``slot * B + position`` (see :mod:`decipher_mr.train.ssl.masking`), which
    masks the same crops of the global batch whatever the number of processes.

    ``mask_indices`` (flat positions of the masked patches in ``masks``) and ``mask_weights`` (``1 / the
    number of masked patches of its crop`` for each) are made here, on the host, so that the training
    step selects the masked tokens with ``index_select`` on the device: boolean indexing there has a
    data-dependent size and makes the host wait for the GPU (DINOv2 does the same).
    """
    n_masked = masked_crop_count(len(samples), float(samples[0]["mask_fraction"]))
    keep = torch.from_numpy(kept_crops(torch.stack([s["mask_slots"] for s in samples]).numpy(), n_masked))  # (B, 2)
    masks = (torch.stack([s["masks"] for s in samples]) & keep[..., None]).transpose(0, 1).flatten(0, 1)  # (2B, N)
    per_crop = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    return {
        "global": torch.stack([s["global"] for s in samples], 1).flatten(0, 1),
        "local": torch.stack([s["local"] for s in samples], 1).flatten(0, 1),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().squeeze(1),
        "mask_weights": (1.0 / per_crop).expand_as(masks)[masks],
        "keys": torch.stack([s["key"] for s in samples]),
    }
