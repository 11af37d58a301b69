"""read_volume on the formats users have: FreeSurfer MGH/MGZ, NIfTI-2, Philips PAR/REC, Siemens mosaic
and enhanced multi-frame DICOM. Only real files: the test data nibabel and pydicom ship, files written by
nibabel (a real writer), and dcm2niix's own conversion as the independent geometry reference."""

from __future__ import annotations

import gzip
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from decipher_mr.data.io import VolumeReadError, read_volume  # noqa: E402

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def _corners(affine: np.ndarray, shape) -> set:
    """World positions (0.01 mm) of the 8 corner voxel centres: equal sets = the same grid in space,
    whatever the axis order or direction each reader chose."""
    pts = np.array([[i * (shape[0] - 1), j * (shape[1] - 1), k * (shape[2] - 1), 1] for i, j, k in itertools.product((0, 1), repeat=3)])
    return {tuple(p) for p in np.round((affine @ pts.T)[:3].T, 2)}


def _gunzip(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src) as fi, open(dest, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    return dest


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    dcm2niix = pytest.importorskip("dcm2niix")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)], check=True, capture_output=True)
    return sorted(out.glob("*.nii"))


# --- nibabel formats -------------------------------------------------------------------------
def test_nifti2_oblique_4d_matches_nibabel_affine_and_voxels():
    f = NIB_DATA / "example_nifti2.nii.gz"
    ref = nib.load(f)
    assert isinstance(ref, nib.Nifti2Image) and abs(ref.affine[1, 2]) > 0.1  # oblique
    with pytest.raises(VolumeReadError, match=r"example_nifti2.nii.gz: is 4D \(32x20x12x2"):
        read_volume(f)
    for t in (0, 1):
        vol = read_volume(f, volume_index=t)
        np.testing.assert_allclose(vol.affine_ras, ref.affine, atol=1e-5)
        np.testing.assert_array_equal(vol.array, np.asanyarray(ref.dataobj)[..., t])
    with pytest.raises(VolumeReadError, match="out of range"):
        read_volume(f, volume_index=2)


def test_parrec_oblique_matches_nibabel_affine_and_scaled_voxels():
    par = NIB_DATA / "phantom_EPI_asc_CLEAR_2_1.PAR"
    ref = nib.load(par)
    assert abs(ref.affine[2, 0]) > 0.5  # oblique slab
    for path in (par, par.with_suffix(".REC")):  # either half of the pair
        vol = read_volume(path, volume_index=1)
        np.testing.assert_allclose(vol.affine_ras, ref.affine, atol=1e-4)
        np.testing.assert_allclose(vol.array, np.asanyarray(ref.dataobj)[..., 1], rtol=1e-6)


def test_parrec_problems_are_named():
    with pytest.raises(VolumeReadError, match=r"T1.PAR: a file it needs is missing .*T1.REC"):
        read_volume(NIB_DATA / "T1.PAR")
    with pytest.raises(VolumeReadError, match=r"phantom_truncated.PAR: not a readable Philips PAR/REC"):
        read_volume(NIB_DATA / "phantom_truncated.PAR")


def test_mgz_sheared_grid_is_refused_not_squared_up():
    # nibabel's test.mgz has a non-orthogonal voxel grid: ITK cannot hold it, so it is refused.
    with pytest.raises(VolumeReadError, match=r"test.mgz: the voxel grid is sheared"):
        read_volume(NIB_DATA / "test.mgz", volume_index=0)


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_mgh_written_by_nibabel_keeps_oblique_geometry(tmp_path, suffix):
    src = nib.load(NIB_DATA / "example_nifti2.nii.gz")
    data = np.asanyarray(src.dataobj)[..., 0].astype(np.float32)
    dest = tmp_path / f"oblique{suffix}"
    nib.save(nib.MGHImage(data, src.affine), dest)
    ref = nib.load(dest)
    vol = read_volume(dest)
    np.testing.assert_allclose(vol.affine_ras, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, np.asanyarray(ref.dataobj))


def test_nifti2_pair_written_by_nibabel(tmp_path):
    src = nib.load(NIB_DATA / "anatomical.nii")
    dest = tmp_path / "anat.hdr"
    nib.save(nib.Nifti2Pair(np.asanyarray(src.dataobj), src.affine), dest)
    vol = read_volume(dest)
    np.testing.assert_allclose(vol.affine_ras, nib.load(dest).affine, atol=1e-5)
    assert vol.shape == (33, 41, 25)
    (tmp_path / "anat.img").unlink()
    with pytest.raises(VolumeReadError, match=r"anat.hdr: .*anat.img"):
        read_volume(dest)


# --- Siemens mosaic --------------------------------------------------------------------------
@pytest.fixture()
def dwi_mosaic(tmp_path) -> Path:
    folder = tmp_path / "dwi"
    _gunzip(NICOM_DATA / "siemens_dwi_0.dcm.gz", folder / "b0.dcm")
    _gunzip(NICOM_DATA / "siemens_dwi_1000.dcm.gz", folder / "b1000.dcm")
    return folder


def test_mosaic_series_is_4d_and_demosaiced_onto_dcm2niix_grid(dwi_mosaic, tmp_path):
    with pytest.raises(VolumeReadError, match=r"Siemens mosaic series of 2 volumes .*128x128x48"):
        read_volume(dwi_mosaic)
    vol = read_volume(dwi_mosaic, volume_index=0, allow_constant=True)  # nibabel's copy has blank pixels
    assert vol.shape == (128, 128, 48)  # 896x896 tiles -> 48 slices of 128x128, never 896x896x2
    np.testing.assert_allclose(sorted(vol.spacing), [1.796875, 1.796875, 3.0], atol=1e-3)
    (nii,) = _dcm2niix(dwi_mosaic, tmp_path / "ref")
    ref = nib.load(nii)
    assert ref.shape[:3] == vol.shape
    assert _corners(vol.affine_ras, vol.shape) == _corners(ref.affine, ref.shape)
    single = read_volume(dwi_mosaic / "b1000.dcm", allow_constant=True)  # one mosaic file = one volume
    assert single.same_geometry(vol)


def test_mosaic_that_cannot_be_demosaiced_is_refused(tmp_path):
    # nibabel's 0.dcm: a 256x256 mosaic whose CSA header promises 48 slices that do not tile it.
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(NICOM_DATA / "0.dcm", folder / "0.dcm")
    for path in (folder, folder / "0.dcm"):
        with pytest.raises(VolumeReadError, match=r"0.dcm: is a Siemens mosaic that cannot be demosaiced"):
            read_volume(path)


# --- enhanced multi-frame MR -----------------------------------------------------------------
def test_enhanced_multiframe_keeps_oblique_geometry(tmp_path):
    from nibabel.nicom import dicomwrappers

    f = _gunzip(NICOM_DATA / "philips_mprage.dcm.gz", tmp_path / "mprage" / "mprage.dcm")
    wrapper = dicomwrappers.wrapper_from_file(str(f))  # nibabel's multi-frame reader: LPS affine
    (nii,) = _dcm2niix(f.parent, tmp_path / "ref")
    ref = nib.load(nii)
    for path in (f, f.parent):
        vol = read_volume(path, allow_constant=True)  # nibabel's copy has blank pixels
        assert vol.shape == (256, 256, 176)
        assert abs(vol.direction[2, 0]) > 0.05  # oblique
        assert _corners(vol.affine_lps, vol.shape) == _corners(wrapper.affine, wrapper.image_shape)
        assert _corners(vol.affine_ras, vol.shape) == _corners(ref.affine, ref.shape)


def test_enhanced_multiframe_without_geometry_is_refused():
    data = pytest.importorskip("pydicom.data")
    try:
        f = data.get_testdata_file("emri_small.dcm", download=False)
    except TypeError:  # older pydicom without the download flag
        f = data.get_testdata_file("emri_small.dcm")
    if f is None:
        pytest.skip("pydicom-data (pydicom's extra test files) is not installed")
    with pytest.raises(VolumeReadError, match=r"emri_small.dcm: multi-frame DICOM without a plane position"):
        read_volume(f)
