"""Crop geometry in millimetres (issue 13, item 6): crops follow the voxel spacing and the slice axis.

The volumes are real files written by a real tool: SimpleITK resamples Colin27 (a real T1 head) and
the demo's knee and lumbar-spine phantoms onto clinical grids (axial, sagittal and coronal thick-slice
series, with the direction matrices a scanner writes), writes them as NIfTI, and the package reads
and prepares them as ``decipher-mr prepare`` does. The test also draws the crops of a brain, a
sagittal spine and a coronal knee into ``Testing/artifacts/crops/crops.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from decipher_mr.data.io import read_volume  # noqa: E402
from decipher_mr.data.preprocess import PreprocessConfig, preprocess_volume  # noqa: E402
from decipher_mr.train.ssl.multicrop import (  # noqa: E402
    DEFAULT_GLOBAL_MM, CropBox, MultiCropConfig, centred_box, crop_axes, crop_resized, global_view, sample_box,
    slice_axis,
)

REPO = Path(__file__).resolve().parents[2]
COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")
ARTIFACTS = REPO / "Testing" / "artifacts" / "crops"
SIZE = (32, 32, 16)  # the tests' global grid; the paper's is 256 x 256 x 24
LOCAL = (16, 16, 8)

# direction matrices (LPS columns = where each file index axis points), as scanners write them
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # rows A->P, columns S->I, slices R->L
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)   # rows R->L, columns S->I, slices A->P
AXIAL = np.eye(3)


def _colin_image():
    if not COLIN.exists():
        pytest.skip(f"{COLIN} (package mricron-data) is not installed")
    return sitk.ReadImage(str(COLIN), sitk.sitkFloat32)


def _phantom_image(kind: str):
    from decipher_mr.data.demo.contrast import synthesize_from_labels
    from decipher_mr.data.demo.phantoms import knee_phantom, spine_phantom

    anatomy = (knee_phantom if kind == "knee" else spine_phantom)(np.random.default_rng(0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(synthesize_from_labels(anatomy.tissue, "T2").astype(np.float32).transpose(2, 1, 0)))
    spacing = anatomy.spacing
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in anatomy.affine_lps[:3, 3]])
    img.SetDirection([float(v) for v in (anatomy.affine_lps[:3, :3] / spacing).flatten()])
    return img


def _centre(img) -> np.ndarray:
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))


def _series(source, size, spacing, direction, path: Path, centre=None) -> Path:
    """``source`` resampled by SimpleITK onto a (size, spacing, direction) grid centred on ``centre``
    (default: the source's centre), written as NIfTI."""
    direction = np.asarray(direction, float)
    centre = _centre(source) if centre is None else np.asarray(centre, float)
    origin = centre - direction @ (np.asarray(spacing, float) * (np.asarray(size) - 1) / 2)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputDirection([float(v) for v in direction.flatten()])
    f.SetOutputOrigin([float(v) for v in origin])
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0)
    sitk.WriteImage(f.Execute(source), str(path))
    return path


def _prepared(path: Path, **cfg):
    """(array, spacing) as ``decipher-mr prepare`` stores it (native spacing unless told)."""
    arr, rec = preprocess_volume(read_volume(path), PreprocessConfig(**{"target_spacing": None, **cfg}))
    return arr, tuple(rec.grid_spacing)


def _content(x: np.ndarray, reference: np.ndarray) -> float:
    lo, hi = float(reference.min()), float(np.percentile(reference, 99))
    return float((x > lo + 0.1 * (hi - lo)).mean())


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Real series on disk: Colin27 axial (native 1 mm and 1.5 mm as prepared by default), a sagittal
    20 x 512 x 512 brain at 4 x 0.5 x 0.5 mm, a coronal brain, a sagittal spine and a coronal knee."""
    d = tmp_path_factory.mktemp("crop_series")
    colin = _colin_image()
    out = {
        "brain_iso": _prepared(COLIN, crop_foreground=False),
        "brain": _prepared(COLIN, target_spacing=(1.5, 1.5, 1.5)),  # the default prepare
        "brain_sagittal": _prepared(_series(colin, (512, 512, 20), (0.5, 0.5, 4.0), SAGITTAL, d / "sag.nii.gz"), crop_foreground=False),
        "brain_coronal": _prepared(_series(colin, (200, 200, 48), (1.0, 1.0, 4.0), CORONAL, d / "cor.nii.gz")),
        "brain_axial_thick": _prepared(_series(colin, (240, 240, 30), (0.9, 0.9, 5.0), AXIAL, d / "ax.nii.gz")),
    }
    spine = _phantom_image("spine")
    out["spine_sagittal"] = _prepared(_series(spine, (512, 512, 20), (0.5, 0.5, 4.0), SAGITTAL, d / "spine.nii.gz"))
    knee = _phantom_image("knee")
    out["knee_coronal"] = _prepared(_series(knee, (320, 384, 40), (0.5, 0.5, 3.0), CORONAL, d / "knee.nii.gz"))
    return out


def test_the_slice_axis_follows_the_spacing(series):
    assert slice_axis((4.0, 0.5, 0.5)) == 0 and slice_axis((0.5, 3.0, 0.5)) == 1 and slice_axis((0.9, 0.9, 5.0)) == 2
    assert slice_axis((1.5, 1.5, 1.5)) == 2 and slice_axis((1.0, 1.1, 1.0)) == 2  # near-isotropic: k
    expected = {"brain_sagittal": 0, "spine_sagittal": 0, "brain_coronal": 1, "knee_coronal": 1,
                "brain_axial_thick": 2, "brain": 2}
    for name, axis in expected.items():
        arr, spacing = series[name]
        assert slice_axis(spacing) == axis, (name, spacing)
        assert crop_axes(spacing)[2] == axis and sorted(crop_axes(spacing)) == [0, 1, 2]
        assert global_view(arr, spacing, SIZE).shape == SIZE  # short axis last, whatever the plane
    arr, spacing = series["brain_sagittal"]
    assert arr.shape == (20, 512, 512) and np.allclose(spacing, (4.0, 0.5, 0.5))  # canonical RAS: slices along i


def test_a_global_crop_of_a_brain_is_mostly_head(series):
    arr, spacing = series["brain"]
    view = global_view(arr, spacing, SIZE)
    assert _content(view, arr) > 0.7, _content(view, arr)
    # the whole field of view (what a scale-1 crop used to be) is much emptier
    assert _content(arr, arr) < _content(view, arr) - 0.1
    rng = np.random.default_rng(0)
    cfg = MultiCropConfig()
    fractions = [_content(crop_resized(arr, sample_box(arr.shape, spacing, cfg.global_mm, cfg.global_scale_inplane,
                                                        cfg.global_scale_through, cfg.aspect, rng), SIZE).numpy(), arr)
                 for _ in range(20)]
    assert np.mean(fractions) > 0.6, fractions


def test_a_sagittal_series_is_cropped_without_squeezing(series):
    """The sagittal 20 x 512 x 512 (4 x 0.5 x 0.5 mm) brain's global view shows the same anatomy,
    at the same scale, as the same physical box cut from the 1 mm isotropic original."""
    sag, sag_spacing = series["brain_sagittal"]
    iso, iso_spacing = series["brain_iso"]
    box = centred_box(sag.shape, sag_spacing)
    assert box.axes == (1, 2, 0)
    mm = box.extent_mm(sag_spacing)
    assert np.allclose(mm, (DEFAULT_GLOBAL_MM[0], DEFAULT_GLOBAL_MM[1], 80.0))  # square in-plane; 20 x 4 mm deep
    pixel = np.asarray(mm) / SIZE
    assert abs(pixel[0] / pixel[1] - 1) < 1e-6 and 0.5 < pixel[2] / pixel[0] < 2  # no 10-21x squeeze
    view = global_view(sag, sag_spacing, SIZE)
    # the same box (both grids share the centre) cut from the isotropic volume
    same = CropBox((1, 2, 0), tuple((n - m / s) / 2 for n, m, s in ((iso.shape[1], mm[0], 1.0), (iso.shape[2], mm[1], 1.0),
                                                                    (iso.shape[0], mm[2], 1.0))), tuple(mm))
    reference = crop_resized(iso, same, SIZE)[0].numpy()
    r = np.corrcoef(view.ravel(), reference.ravel())[0, 1]
    assert r > 0.95, r


def test_local_crops_are_smaller_in_plane_and_through_plane(series):
    cfg = MultiCropConfig()
    rng = np.random.default_rng(1)
    for name in ("brain", "spine_sagittal", "knee_coronal"):
        arr, spacing = series[name]
        g = [sample_box(arr.shape, spacing, cfg.global_mm, cfg.global_scale_inplane, cfg.global_scale_through, cfg.aspect, rng).extent_mm(spacing) for _ in range(200)]
        loc = [sample_box(arr.shape, spacing, cfg.local_mm, cfg.local_scale_inplane, cfg.local_scale_through, cfg.aspect, rng).extent_mm(spacing) for _ in range(200)]
        g_area, l_area = np.array([a * b for a, b, _ in g]), np.array([a * b for a, b, _ in loc])
        assert l_area.max() <= g_area.min() * 1.001, name
        assert l_area.mean() < 0.3 * g_area.mean(), name
        assert np.mean([c for *_, c in loc]) < 0.6 * np.mean([c for *_, c in g]), name
        for a, b, _ in g + loc:  # aspect jitter only, never a squeeze
            assert 0.74 < a / b < 1.34, (name, a, b)


def _one_item_cache(folder: Path, arr: np.ndarray, spacing) -> Path:
    """A prepared cache (the index format PreparedCache reads) holding one array."""
    (folder / "items").mkdir()
    np.save(folder / "items" / "sag.npy", arr)
    row = {"id": "sag", "array": "items/sag.npy", "shape": list(arr.shape), "spacing": list(spacing)}
    (folder / "index.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def test_the_dataset_crops_with_the_items_spacing(series, tmp_path):
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.train.ssl.multicrop import MultiCropDataset

    arr, spacing = series["brain_sagittal"]
    _one_item_cache(tmp_path, arr, spacing)
    fov = tuple(float(n * s) for n, s in ((arr.shape[1], spacing[1]), (arr.shape[2], spacing[2]), (arr.shape[0], spacing[0])))
    # scale 1 over the whole field of view and no augmentation: both global crops are the global view
    cfg = MultiCropConfig(global_size=SIZE, local_size=LOCAL, n_local=2, global_mm=fov, global_scale_inplane=(1, 1),
                          global_scale_through=(1, 1), aspect=(1, 1), flip_probability=0, gamma_probability=0,
                          contrast_probability=0, bias_field_probability=0, noise_probability=0)
    views = MultiCropDataset(PreparedCache(tmp_path), None, cfg)[(0, 7)]
    expected = global_view(arr, spacing, SIZE, fov)
    for v in range(2):
        assert np.allclose(views["global"][v, 0].numpy(), expected, atol=1e-5)
    assert views["local"].shape == (2, 1, *LOCAL)


def test_stage2_views_have_the_geometry_of_a_stage1_global_crop(series, tmp_path):
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.train.align_views import image_batch

    arr, spacing = series["brain_sagittal"]
    _one_item_cache(tmp_path, arr, spacing)
    image_cfg = {"size": list(SIZE), "mode": "view", "mm": [176, 176, 128], "augment": False}
    batch = image_batch(PreparedCache(tmp_path), [0], image_cfg, rng=None)
    assert batch.shape == (1, 1, *SIZE)
    assert np.allclose(batch[0, 0].numpy(), global_view(arr, spacing, SIZE, (176, 176, 128)), atol=1e-6)


def test_resampling_is_exact_on_identity_transpose_and_integer_downsampling():
    a = np.random.default_rng(0).random((10, 12, 14), dtype=np.float32)
    whole = CropBox((0, 1, 2), (0.0, 0.0, 0.0), (10.0, 12.0, 14.0))
    assert np.allclose(crop_resized(a, whole, (10, 12, 14))[0].numpy(), a, atol=1e-6)
    assert np.allclose(crop_resized(a, CropBox((1, 2, 0), (0.0, 0.0, 0.0), (12.0, 14.0, 10.0)), (12, 14, 10))[0].numpy(),
                       a.transpose(1, 2, 0), atol=1e-6)
    assert np.allclose(crop_resized(a, whole, (5, 6, 7))[0].numpy(), a.reshape(5, 2, 6, 2, 7, 2).mean((1, 3, 5)), atol=1e-6)
    # outside the volume: the background (the region's minimum)
    out = crop_resized(a, CropBox((0, 1, 2), (-10.0, 0.0, 0.0), (20.0, 12.0, 14.0)), (20, 12, 14))[0].numpy()
    assert np.all(out[:10] == a.min()) and np.allclose(out[10:], a, atol=1e-6)


def test_write_the_crops_png(series):
    """Crops of a brain (axial), a sagittal lumbar spine and a coronal knee, for a person to look at."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cfg = MultiCropConfig(global_size=(128, 128, 24), local_size=(64, 64, 16))
    rows = [("brain, axial, 1.5 mm iso", "brain"), ("brain, sagittal 20x512x512, 4x0.5x0.5 mm", "brain_sagittal"),
            ("lumbar spine, sagittal, 4x0.5x0.5 mm", "spine_sagittal"), ("knee, coronal, 0.5x3x0.5 mm", "knee_coronal")]
    cols = ["series (mid-slice in the crop plane)", "global view (stage 2)", "global view, through-plane", "random global",
            "random global", "local", "local", "local"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.9 * len(rows)))
    rng = np.random.default_rng(0)
    for r, (title, name) in enumerate(rows):
        arr, spacing = series[name]
        ax3 = crop_axes(spacing)
        vmin, vmax = float(arr.min()), float(np.percentile(arr, 99.5))
        show = dict(cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
        # the series' mid-slice in the crop plane, at its physical aspect ratio, with the global box
        mid = np.take(np.asarray(arr), arr.shape[ax3[2]] // 2, axis=ax3[2])
        mid = mid if ax3[0] < ax3[1] else mid.T
        sx, sy = spacing[ax3[0]], spacing[ax3[1]]
        axes[r, 0].imshow(mid.T, extent=(0, mid.shape[0] * sx, 0, mid.shape[1] * sy), **show)
        box = centred_box(arr.shape, spacing, cfg.global_mm)
        axes[r, 0].add_patch(Rectangle((box.start[0] * sx, box.start[1] * sy), box.extent[0] * sx, box.extent[1] * sy,
                                       fill=False, color="orange", lw=1.5))
        axes[r, 0].set_title(title, fontsize=8)
        view = global_view(arr, spacing, cfg.global_size, cfg.global_mm)
        mm = box.extent_mm(spacing)
        px = [m / n for m, n in zip(mm, cfg.global_size)]
        axes[r, 1].imshow(view[:, :, view.shape[2] // 2].T, aspect=px[1] / px[0], **show)
        axes[r, 1].set_title(f"{mm[0]:.0f}x{mm[1]:.0f}x{mm[2]:.0f} mm", fontsize=8)
        axes[r, 2].imshow(view[:, view.shape[1] // 2, :].T, aspect=px[2] / px[0], **show)
        crops = [(cfg.global_mm, cfg.global_scale_inplane, cfg.global_scale_through, cfg.global_size)] * 2 + \
                [(cfg.local_mm, cfg.local_scale_inplane, cfg.local_scale_through, cfg.local_size)] * 3
        for c, (mm_cfg, inplane, through, size) in enumerate(crops, start=3):
            b = sample_box(arr.shape, spacing, mm_cfg, inplane, through, cfg.aspect, rng)
            x = crop_resized(arr, b, size)[0].numpy()
            e = b.extent_mm(spacing)
            axes[r, c].imshow(x[:, :, x.shape[2] // 2].T, aspect=(e[1] / size[1]) / (e[0] / size[0]), **show)
            axes[r, c].set_title(f"{e[0]:.0f}x{e[1]:.0f}x{e[2]:.0f} mm", fontsize=8)
    for c, label in enumerate(cols):
        axes[0, c].text(0.5, 1.25, label, transform=axes[0, c].transAxes, ha="center", fontsize=8, weight="bold")
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "crops.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    assert out.stat().st_size > 10_000
