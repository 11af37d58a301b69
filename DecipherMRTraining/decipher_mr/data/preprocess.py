"""Preprocessing a volume onto the canonical grid, and mapping results back to the source grid.

Canonical orientation (every prepared array, every model input, every bundle uses it)
------------------------------------------------------------------------------------
**RAS+ voxel axes**, nibabel's "closest canonical" convention:

* array axis 0 (``i``) increases toward the patient's **Right**  (index 0 = the patient's left edge),
* array axis 1 (``j``) increases toward **Anterior**               (index 0 = posterior edge),
* array axis 2 (``k``) increases toward **Superior**               (index 0 = inferior edge).

In the LPS world frame of :class:`~decipher_mr.data.volume.Volume` that is the direction matrix
``diag(-1, -1, 1)`` (:data:`CANONICAL_DIRECTION_LPS`); its IJK→RAS matrix is a positive diagonal.

Steps of :func:`preprocess_volume`, in order
--------------------------------------------
1. **Canonicalise** by permuting and flipping array axes to the orientation closest to RAS+. This
   moves voxels without interpolating them, so a label stays a label and left stays left.
2. If the direction is **oblique** (after step 1 it still differs from RAS+ by more than
   ``oblique_tolerance`` in any direction cosine), resample onto an axis-aligned RAS+ grid that covers
   the whole field of view.
3. **Resample** to ``target_spacing`` (anisotropic allowed; ``None`` keeps the native spacing). The new
   grid has the same centre as the old one. Downsampling first low-passes the image (``antialias``).
4. **Intensity**: clip to the ``clip_percentiles`` and scale (``minmax`` → [0, 1], ``zscore`` over the
   foreground, or ``none``).
5. Optional **foreground crop** (bounding box of voxels above ``foreground_threshold`` of the clipped
   range, plus ``crop_margin_mm``).

Everything needed to undo steps 1–3 and 5 is kept in a JSON-serialisable :class:`GeometryRecord`;
:func:`restore` maps any array on the prepared grid (a segmentation, a heatmap) back onto the exact
source geometry, and :func:`resample_to_prepared` maps another volume of the same patient (a mask, an
atlas) onto the prepared grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .volume import Volume

CANONICAL_ORIENTATION = "RAS"
CANONICAL_DIRECTION_LPS = np.diag([-1.0, -1.0, 1.0])
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
RECORD_VERSION = 1
SCALE_MODES = ("minmax", "zscore", "none")
INTERPOLATIONS = ("linear", "bspline", "nearest")


@dataclass
class PreprocessConfig:
    """How series are prepared. Stored in the cache and in model bundles.

    >>> cfg = PreprocessConfig(target_spacing=(1.0, 1.0, 3.0), crop_foreground=False)
    """

    target_spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    scale: str = "minmax"
    crop_foreground: bool = True
    crop_margin_mm: float = 8.0
    foreground_threshold: float = 0.05
    interpolation: str = "linear"
    antialias: bool = True
    oblique_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.target_spacing is not None:
            ts = tuple(float(s) for s in self.target_spacing)
            if len(ts) == 1:
                ts = ts * 3
            if len(ts) != 3 or any(not s > 0 for s in ts):
                raise ValueError(f"target_spacing must be three positive numbers or None, got {self.target_spacing}")
            self.target_spacing = ts  # type: ignore[assignment]
        lo, hi = (float(p) for p in self.clip_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        self.clip_percentiles = (lo, hi)
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {SCALE_MODES}, got {self.scale!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_margin_mm < 0:
            raise ValueError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_spacing"] = None if self.target_spacing is None else list(self.target_spacing)
        out["clip_percentiles"] = list(self.clip_percentiles)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "PreprocessConfig":
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing settings: {sorted(unknown)}")
        return cls(**obj)


@dataclass
class GeometryRecord:
    """Everything needed to map between the source grid and the prepared grid (JSON-serialisable).

    ``permutation[a]`` is the source axis that became canonical axis ``a``; ``flips[a]`` says whether
    it was reversed. ``grid_*`` describe the canonical (possibly resampled) grid before the crop
    ``[crop_start, crop_stop)``; its direction is always :data:`CANONICAL_DIRECTION_LPS`.

    >>> rec = GeometryRecord.from_json(json.loads(text)); rec.prepared_shape
    (120, 144, 120)
    """

    source_shape: list[int]
    source_spacing: list[float]
    source_origin: list[float]
    source_direction: list[float]  # 3x3 row-major, columns = LPS axis directions
    permutation: list[int]
    flips: list[bool]
    resampled: bool
    grid_shape: list[int]
    grid_spacing: list[float]
    grid_origin: list[float]
    crop_start: list[int]
    crop_stop: list[int]
    intensity: dict[str, Any] = field(default_factory=dict)
    orientation: str = CANONICAL_ORIENTATION
    version: int = RECORD_VERSION

    @property
    def prepared_shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.crop_start, self.crop_stop))  # type: ignore[return-value]

    @property
    def prepared_origin(self) -> tuple[float, float, float]:
        offset = np.asarray(self.crop_start, float) * np.asarray(self.grid_spacing, float)
        return tuple(float(v) for v in np.asarray(self.grid_origin) + CANONICAL_DIRECTION_LPS @ offset)  # type: ignore[return-value]

    def source_geometry(self) -> dict[str, Any]:
        return {
            "spacing": tuple(self.source_spacing),
            "origin": tuple(self.source_origin),
            "direction": np.asarray(self.source_direction, float).reshape(3, 3),
        }

    def prepared_volume(self, array: np.ndarray, path: str | None = None) -> Volume:
        """Wrap an array on the prepared grid with its world geometry (e.g. to save a heatmap).

        >>> write_volume(rec.prepared_volume(heatmap), "heatmap.nii.gz")
        """
        _check_prepared_shape(array, self)
        return Volume(array, tuple(self.grid_spacing), self.prepared_origin, CANONICAL_DIRECTION_LPS.copy(), path)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "GeometryRecord":
        if int(obj.get("version", RECORD_VERSION)) > RECORD_VERSION:
            raise ValueError(f"geometry record version {obj['version']} is newer than this code understands")
        return cls(**{k: v for k, v in obj.items() if k in cls.__dataclass_fields__})


def canonical_axes(direction: np.ndarray) -> tuple[list[int], list[bool]]:
    """Axis permutation and flips that bring a direction matrix closest to RAS+.

    >>> canonical_axes(np.diag([1.0, 1.0, 1.0]))   # LPS on disk
    ([0, 1, 2], [True, True, False])
    """
    from scipy.optimize import linear_sum_assignment

    ras = _LPS_TO_RAS @ np.asarray(direction, float).reshape(3, 3)
    # Rows are world axes (R, A, S), columns array axes; pick the one-to-one match with the largest
    # cosines so that even a 45-degree oblique scan gets a stable, unique assignment.
    rows, cols = linear_sum_assignment(-np.abs(ras))
    perm = [int(c) for _, c in sorted(zip(rows, cols))]
    flips = [bool(ras[w, perm[w]] < 0) for w in range(3)]
    return perm, flips


def canonicalize(volume: Volume) -> tuple[Volume, list[int], list[bool]]:
    """Permute and flip array axes (no interpolation) to the orientation closest to RAS+.

    >>> canon, perm, flips = canonicalize(read_volume("lps_copy.nii.gz"))
    """
    perm, flips = canonical_axes(volume.direction)
    arr = np.transpose(volume.array, perm)
    flip_axes = tuple(a for a in range(3) if flips[a])
    if flip_axes:
        arr = np.flip(arr, flip_axes)
    src_shape = volume.shape
    corner = np.zeros(3)
    signs = np.ones(3)
    for a in range(3):
        if flips[a]:
            corner[perm[a]] = src_shape[perm[a]] - 1
            signs[a] = -1.0
    origin = (volume.affine_lps @ np.append(corner, 1.0))[:3]
    direction = volume.direction[:, perm] * signs
    spacing = tuple(volume.spacing[p] for p in perm)
    return Volume(np.ascontiguousarray(arr), spacing, tuple(origin), direction, volume.path), perm, flips


def preprocess_volume(volume: Volume, config: PreprocessConfig | None = None) -> tuple[np.ndarray, GeometryRecord]:
    """Canonicalise, resample, normalise and crop one volume; return the float32 array and its record.

    >>> arr, rec = preprocess_volume(read_volume("ch2.nii.gz"), PreprocessConfig(target_spacing=(2, 2, 2)))
    """
    config = config or PreprocessConfig()
    canon, perm, flips = canonicalize(volume)
    oblique = not np.allclose(canon.direction, CANONICAL_DIRECTION_LPS, atol=config.oblique_tolerance)
    native = np.asarray(canon.spacing)
    target = native if config.target_spacing is None else np.asarray(config.target_spacing, float)
    resampled = oblique or not np.allclose(target, native, rtol=1e-6, atol=1e-6)

    if resampled:
        grid_shape, grid_origin = _covering_grid(canon, target)
        source = canon
        if config.antialias and np.any(target > native * (1 + 1e-6)):
            source = canon.with_array(_lowpass(canon.array, native, target))
        interp = "nearest" if config.interpolation == "nearest" else config.interpolation
        arr = _resample(source, grid_shape, tuple(target), grid_origin, CANONICAL_DIRECTION_LPS, interp, float(canon.array.min()))
        grid_spacing = [float(s) for s in target]
    else:
        arr = canon.array
        grid_shape = list(canon.shape)
        grid_origin = [float(v) for v in canon.origin]
        grid_spacing = [float(s) for s in native]

    arr = np.asarray(arr, dtype=np.float32)
    arr, intensity = _normalise(arr, config)

    start, stop = [0, 0, 0], list(grid_shape)
    if config.crop_foreground:
        start, stop = _foreground_box(arr, intensity, config, grid_spacing)
        arr = arr[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]

    record = GeometryRecord(
        source_shape=list(volume.shape),
        source_spacing=[float(s) for s in volume.spacing],
        source_origin=[float(v) for v in volume.origin],
        source_direction=[float(v) for v in np.asarray(volume.direction).flatten()],
        permutation=perm,
        flips=flips,
        resampled=bool(resampled),
        grid_shape=[int(n) for n in grid_shape],
        grid_spacing=grid_spacing,
        grid_origin=[float(v) for v in grid_origin],
        crop_start=[int(v) for v in start],
        crop_stop=[int(v) for v in stop],
        intensity=intensity,
    )
    return np.ascontiguousarray(arr, dtype=np.float32), record


def restore(array: np.ndarray, record: GeometryRecord, interpolation: str = "linear", fill: float = 0.0) -> Volume:
    """Map an array on the prepared grid back onto the exact source grid (shape, spacing, origin, direction).

    Use ``interpolation="nearest"`` for label maps. Voxels outside the prepared crop get ``fill``.

    >>> seg_on_source = restore(seg_prepared, rec, interpolation="nearest")
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    _check_prepared_shape(array, record)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    full = np.full(record.grid_shape, fill, dtype=array.dtype)
    s, e = record.crop_start, record.crop_stop
    full[s[0] : e[0], s[1] : e[1], s[2] : e[2]] = array
    geometry = record.source_geometry()

    if not record.resampled:
        flip_axes = tuple(a for a in range(3) if record.flips[a])
        if flip_axes:
            full = np.flip(full, flip_axes)
        src = np.ascontiguousarray(np.transpose(full, np.argsort(record.permutation)))
        return Volume(src, **geometry)

    grid = Volume(full, tuple(record.grid_spacing), tuple(record.grid_origin), CANONICAL_DIRECTION_LPS.copy())
    if interpolation != "nearest" and not np.issubdtype(full.dtype, np.floating):
        grid = grid.with_array(full.astype(np.float32))
    out = _resample(
        grid, record.source_shape, tuple(record.source_spacing), record.source_origin, geometry["direction"], interpolation, fill
    )
    return Volume(out, **geometry)


def resample_to_prepared(volume: Volume, record: GeometryRecord, interpolation: str = "nearest", fill: float = 0.0) -> np.ndarray:
    """Map another volume of the same series (a mask, an atlas) onto the prepared grid.

    When the volume shares the source grid and no resampling happened, voxels are moved exactly.

    >>> mask_prepared = resample_to_prepared(read_volume("mask.nii.gz", allow_constant=True), rec)
    """
    s, e = record.crop_start, record.crop_stop
    same_grid = (
        volume.shape == tuple(record.source_shape)
        and np.allclose(volume.spacing, record.source_spacing, atol=1e-4)
        and np.allclose(volume.origin, record.source_origin, atol=1e-3)
        and np.allclose(volume.direction.flatten(), record.source_direction, atol=1e-4)
    )
    if same_grid and not record.resampled:
        full = canonicalize(volume)[0].array
    else:
        full = _resample(
            volume,
            record.grid_shape,
            tuple(record.grid_spacing),
            record.grid_origin,
            CANONICAL_DIRECTION_LPS,
            interpolation,
            fill,
        )
    return np.ascontiguousarray(full[s[0] : e[0], s[1] : e[1], s[2] : e[2]])


# --- internals ------------------------------------------------------------------------------
def _check_prepared_shape(array: np.ndarray, record: GeometryRecord) -> None:
    if tuple(np.shape(array)) != record.prepared_shape:
        raise ValueError(f"array shape {tuple(np.shape(array))} does not match the prepared grid {record.prepared_shape}")


def _covering_grid(canon: Volume, spacing: np.ndarray) -> tuple[list[int], list[float]]:
    """An RAS+ grid with ``spacing`` that covers the field of view of ``canon`` and shares its centre."""
    n = np.asarray(canon.shape, float)
    axes = np.asarray(canon.direction) @ np.diag(canon.spacing)
    # Field-of-view corners are half a voxel outside the corner voxel centres.
    corners = np.array([[x, y, z] for x in (-0.5, n[0] - 0.5) for y in (-0.5, n[1] - 0.5) for z in (-0.5, n[2] - 0.5)])
    world = corners @ axes.T + np.asarray(canon.origin)
    coords = world @ CANONICAL_DIRECTION_LPS  # coordinates along the canonical axes (orthonormal)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    # Round first so that an axis-aligned FOV that is an exact multiple of the spacing is not
    # enlarged by a floating-point hair.
    shape = [max(1, int(math.ceil(round((h - l) / s, 6)))) for l, h, s in zip(lo, hi, spacing)]
    centre = (lo + hi) / 2.0
    start = centre - (np.asarray(shape) - 1) / 2.0 * spacing
    origin = CANONICAL_DIRECTION_LPS @ start
    return shape, [float(v) for v in origin]


def _lowpass(array: np.ndarray, native: np.ndarray, target: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    # Gaussian whose FWHM makes up the difference between the old and the new voxel size.
    sigma_mm = np.sqrt(np.clip(target**2 - native**2, 0.0, None)) / 2.3548
    return gaussian_filter(array.astype(np.float32), sigma=sigma_mm / native, mode="nearest")


def _resample(volume: Volume, shape, spacing, origin, direction, interpolation: str, fill: float) -> np.ndarray:
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    src = volume
    if interpolation != "nearest" and not np.issubdtype(volume.array.dtype, np.floating):
        src = volume.with_array(volume.array.astype(np.float32))
    elif volume.array.dtype == bool:
        src = volume.with_array(volume.array.astype(np.uint8))
    img = src.to_sitk()
    out = sitk.Resample(
        img,
        [int(n) for n in shape],
        sitk.Transform(),
        interp,
        [float(v) for v in origin],
        [float(s) for s in spacing],
        [float(v) for v in np.asarray(direction, float).flatten()],
        float(fill),
        img.GetPixelID(),
    )
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def _normalise(arr: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
    lo, hi = (float(v) for v in np.percentile(arr, config.clip_percentiles))
    if hi <= lo:  # a mostly-empty image: fall back to the full range rather than dividing by zero
        lo, hi = float(arr.min()), float(arr.max())
    arr = np.clip(arr, lo, hi)
    info: dict[str, Any] = {"clip_low": lo, "clip_high": hi, "scale": config.scale}
    if config.scale == "minmax":
        arr = (arr - lo) / max(hi - lo, 1e-12)
    elif config.scale == "zscore":
        fg = arr[arr > lo + config.foreground_threshold * (hi - lo)]
        fg = fg if fg.size else arr
        mean, std = float(fg.mean()), float(fg.std())
        arr = (arr - mean) / max(std, 1e-12)
        info.update(mean=mean, std=std)
    return arr.astype(np.float32, copy=False), info


def _foreground_box(arr: np.ndarray, intensity: dict[str, Any], config: PreprocessConfig, spacing: list[float]):
    lo, hi = intensity["clip_low"], intensity["clip_high"]
    threshold = lo + config.foreground_threshold * (hi - lo)
    if config.scale == "minmax":
        threshold = config.foreground_threshold
    elif config.scale == "zscore":
        threshold = (threshold - intensity["mean"]) / max(intensity["std"], 1e-12)
    mask = arr > threshold
    if not mask.any():
        return [0, 0, 0], list(arr.shape)
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        margin = int(math.ceil(config.crop_margin_mm / spacing[axis]))
        start.append(max(0, int(hits[0]) - margin))
        stop.append(min(arr.shape[axis], int(hits[-1]) + 1 + margin))
    return start, stop
