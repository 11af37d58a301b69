"""Preprocessing onto the canonical RAS+ grid and mapping back: orientation, spacing, oblique scans."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from decipher_mr.assets import aal_atlas, aal_region_names, colin27_t1
from decipher_mr.data.io import read_volume
from decipher_mr.data.preprocess import (
    CANONICAL_DIRECTION_LPS,
    GeometryRecord,
    PreprocessConfig,
    canonical_axes,
    preprocess_volume,
    resample_to_prepared,
    restore,
)
from decipher_mr.data.volume import Volume


def reoriented_copy(src: Path, axcodes: str, dest: Path) -> Path:
    """Store a NIfTI with another on-disk orientation (nibabel does it, independently of our code)."""
    img = nib.load(str(src))
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(tuple(axcodes))
    )
    out = img.as_reoriented(transform)
    assert nib.aff2axcodes(out.affine) == tuple(axcodes)
    nib.save(out, str(dest))
    return dest


def resampled(vol: Volume, spacing, direction=None, interpolator=sitk.sitkLinear) -> Volume:
    """``vol`` resampled onto a grid with ``spacing`` (and ``direction``) covering the same centre."""
    img = vol.to_sitk()
    direction = np.asarray(vol.direction if direction is None else direction, float)
    size = [int(round(n * s / t)) for n, s, t in zip(vol.shape, vol.spacing, spacing)]
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in vol.shape]))
    origin = centre - direction @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing))
    out = sitk.Resample(img, size, sitk.Transform(), interpolator, origin.tolist(), list(spacing), direction.flatten().tolist(), 0.0)
    return Volume.from_sitk(out)


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    z, x = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def mean_region_dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = [v for v in np.unique(a) if v != 0]
    return float(np.mean([dice(a == v, b == v) for v in labels]))


@pytest.fixture(scope="module")
def colin() -> Volume:
    return read_volume(colin27_t1())


@pytest.fixture(scope="module")
def aal() -> Volume:
    return read_volume(aal_atlas())


def test_colin27_round_trip_restores_the_source_geometry_and_voxels(colin):
    arr, rec = preprocess_volume(colin, PreprocessConfig(target_spacing=None, crop_foreground=False))
    back = restore(arr, rec)
    assert back.same_geometry(colin, atol=0)
    lo, hi = rec.intensity["clip_low"], rec.intensity["clip_high"]
    expected = (np.clip(colin.array.astype(np.float64), lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(back.array, expected, atol=1e-5)


def test_prepared_intensities_are_clipped_and_scaled_to_unit_range(colin):
    arr, _ = preprocess_volume(colin, PreprocessConfig(target_spacing=(3, 3, 3)))
    assert arr.dtype == np.float32
    assert arr.min() == pytest.approx(0.0, abs=1e-6) and arr.max() == pytest.approx(1.0, abs=1e-6)


def test_zscore_scaling_centres_the_foreground(colin):
    arr, rec = preprocess_volume(colin, PreprocessConfig(target_spacing=(3, 3, 3), scale="zscore", crop_foreground=False))
    lo, hi = rec.intensity["clip_low"], rec.intensity["clip_high"]
    fg = arr > (lo + 0.05 * (hi - lo) - rec.intensity["mean"]) / rec.intensity["std"]
    assert abs(float(arr[fg].mean())) < 0.05 and abs(float(arr[fg].std()) - 1.0) < 0.05


def test_target_spacing_sets_the_prepared_voxel_size(colin):
    arr, rec = preprocess_volume(colin, PreprocessConfig(target_spacing=(2.0, 2.5, 3.0), crop_foreground=False))
    assert rec.grid_spacing == [2.0, 2.5, 3.0]
    # The grid covers the whole field of view: partial voxels at the border round up.
    assert arr.shape == (math.ceil(181 / 2.0), math.ceil(217 / 2.5), math.ceil(181 / 3.0))


@pytest.mark.parametrize("axcodes", ["LPS", "PIR"])
def test_left_stays_left_whatever_the_on_disk_orientation(tmp_path, axcodes):
    image = read_volume(reoriented_copy(colin27_t1(), axcodes, tmp_path / f"ch2_{axcodes}.nii.gz"))
    regions = read_volume(reoriented_copy(aal_atlas(), axcodes, tmp_path / f"aal_{axcodes}.nii.gz"))
    assert not np.allclose(image.direction, CANONICAL_DIRECTION_LPS)

    _, rec = preprocess_volume(image, PreprocessConfig(target_spacing=None))
    labels = resample_to_prepared(regions, rec)
    names = aal_region_names()
    i_index = np.broadcast_to(np.arange(labels.shape[0])[:, None, None], labels.shape)
    counts = np.bincount(labels.ravel())
    i_sum = np.bincount(labels.ravel(), weights=i_index.ravel())
    i_centre = {v: i_sum[v] / counts[v] for v in names if v < len(counts) and counts[v]}
    pairs = [(v, w) for v, n in names.items() for w, m in names.items() if n.endswith("_L") and m == n[:-2] + "_R"]
    assert len(pairs) > 40
    # Axis 0 increases toward the patient's right, so every left region lies at lower i than its twin.
    assert all(i_centre[left] < i_centre[right] for left, right in pairs)

    back = restore(labels, rec, interpolation="nearest")
    assert back.same_geometry(regions, atol=0)
    np.testing.assert_array_equal(back.array, regions.array)


def test_canonical_axes_of_an_lps_scan_flip_the_first_two_axes():
    assert canonical_axes(np.eye(3)) == ([0, 1, 2], [True, True, False])


def test_anisotropic_thick_slice_round_trip(colin, aal):
    thick = resampled(colin, (1.0, 1.0, 4.0))
    thick_labels = resampled(aal, (1.0, 1.0, 4.0), interpolator=sitk.sitkNearestNeighbor)
    arr, rec = preprocess_volume(thick, PreprocessConfig(target_spacing=(1.5, 1.5, 3.0)))
    assert rec.resampled and rec.grid_spacing == [1.5, 1.5, 3.0]

    back = restore(arr, rec)
    assert back.same_geometry(thick, atol=0)
    inside = restore(np.ones_like(arr), rec, interpolation="nearest").array > 0
    assert np.corrcoef(back.array[inside], thick.array[inside])[0, 1] > 0.97

    labels_back = restore(resample_to_prepared(thick_labels, rec), rec, interpolation="nearest")
    assert dice(labels_back.array > 0, thick_labels.array > 0) > 0.97
    assert mean_region_dice(thick_labels.array, labels_back.array) > 0.85


def test_oblique_volume_is_resampled_to_canonical_and_maps_back(colin, aal):
    tilt = np.diag([-1.0, -1.0, 1.0]) @ rotation(20, 12)
    oblique = resampled(colin, (2.0, 2.0, 2.0), direction=tilt)
    oblique_labels = resampled(aal, (2.0, 2.0, 2.0), direction=tilt, interpolator=sitk.sitkNearestNeighbor)
    arr, rec = preprocess_volume(oblique, PreprocessConfig(target_spacing=(2.0, 2.0, 2.0)))
    assert rec.resampled
    assert rec.prepared_volume(arr).direction.tolist() == CANONICAL_DIRECTION_LPS.tolist()

    labels_back = restore(resample_to_prepared(oblique_labels, rec), rec, interpolation="nearest")
    assert labels_back.same_geometry(oblique_labels, atol=0)
    assert dice(labels_back.array > 0, oblique_labels.array > 0) > 0.95
    assert mean_region_dice(oblique_labels.array, labels_back.array) > 0.75


def test_foreground_crop_keeps_the_whole_brain(aal):
    brain = read_volume(colin27_t1("ch2bet"))
    arr, rec = preprocess_volume(brain, PreprocessConfig(target_spacing=(2, 2, 2), crop_margin_mm=4))
    assert arr.size < np.prod(rec.grid_shape) * 0.8
    labels = resample_to_prepared(aal, rec)
    full = resample_to_prepared(aal, GeometryRecord.from_json({**rec.to_json(), "crop_start": [0, 0, 0], "crop_stop": rec.grid_shape}))
    assert np.count_nonzero(labels) == np.count_nonzero(full)


def test_geometry_record_survives_json(colin):
    arr, rec = preprocess_volume(colin, PreprocessConfig(target_spacing=(3, 3, 3)))
    again = GeometryRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again == rec
    assert restore(arr, again).same_geometry(colin, atol=0)


def test_restore_refuses_an_array_of_the_wrong_shape(colin):
    arr, rec = preprocess_volume(colin, PreprocessConfig(target_spacing=(3, 3, 3)))
    with pytest.raises(ValueError, match="does not match the prepared grid"):
        restore(arr[1:], rec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_spacing": (1.0, -1.0, 1.0)}, "target_spacing"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles"),
        ({"scale": "log"}, "scale"),
        ({"interpolation": "cubic"}, "interpolation"),
    ],
)
def test_invalid_settings_are_refused_with_the_setting_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)
