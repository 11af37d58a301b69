"""Reading MRI volumes and reports: formats, geometry, and a clear error for every bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from decipher_mr.assets import colin27_t1
from decipher_mr.data.io import ReportReadError, VolumeReadError, list_dicom_series, read_report, read_volume
from decipher_mr.data.io import write_dicom_series as io_write_dicom_series
from decipher_mr.data.volume import Volume, write_volume


def small_colin(mm: float = 4.0) -> sitk.Image:
    """Real Colin27 T1 resampled to ``mm`` isotropic (keeps tests fast)."""
    img = sitk.ReadImage(str(colin27_t1()))
    size = [int(round(n * s / mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (mm,) * 3, img.GetDirection(), 0.0, sitk.sitkInt16)


def write_dicom_series(img: sitk.Image, folder: Path, series_uid: str, description: str) -> None:
    io_write_dicom_series(Volume.from_sitk(img), folder, series_uid, description)


@pytest.fixture(scope="module")
def colin4() -> sitk.Image:
    return small_colin(4.0)


def test_nifti_is_read_with_its_geometry():
    vol = read_volume(colin27_t1())
    assert vol.shape == (181, 217, 181)
    assert vol.spacing == (1.0, 1.0, 1.0)
    # Colin27 is stored RAS: in LPS the i and j axes point to -x and -y.
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, -1.0, 1.0]))
    assert vol.origin == (90.0, 125.0, -71.0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_are_read_back_with_the_same_voxels_and_geometry(tmp_path, colin4, suffix):
    src = Volume.from_sitk(colin4)
    path = write_volume(src, tmp_path / f"colin{suffix}")
    vol = read_volume(path)
    assert vol.same_geometry(src)
    np.testing.assert_array_equal(vol.array, src.array)


def test_dicom_series_written_from_colin27_reads_back_with_the_same_geometry(tmp_path, colin4):
    write_dicom_series(colin4, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.2.1", "T1_axial")
    vol = read_volume(tmp_path / "dicom")
    src = Volume.from_sitk(colin4)
    assert vol.shape == src.shape
    np.testing.assert_allclose(vol.spacing, src.spacing, atol=1e-4)
    np.testing.assert_allclose(vol.origin, src.origin, atol=1e-3)
    np.testing.assert_allclose(vol.direction, src.direction, atol=1e-6)
    np.testing.assert_array_equal(vol.array, src.array)


def test_dicom_files_carry_standard_tags_pydicom_reads(tmp_path, colin4):
    import pydicom

    write_dicom_series(colin4, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.2.1", "T1_axial")
    ds = pydicom.dcmread(sorted((tmp_path / "dicom").iterdir())[0])
    assert ds.Modality == "MR"
    assert ds.SeriesInstanceUID == "1.2.826.0.1.3680043.2.1125.2.1"


def test_dicom_folder_with_two_series_lists_the_choices(tmp_path, colin4):
    folder = tmp_path / "mixed"
    write_dicom_series(colin4, folder, "1.2.826.0.1.3680043.2.1125.3.1", "T1_first")
    write_dicom_series(colin4[:, :, :10], folder, "1.2.826.0.1.3680043.2.1125.3.2", "T1_second")
    with pytest.raises(VolumeReadError) as err:
        read_volume(folder)
    msg = str(err.value)
    assert str(folder) in msg and "2 series" in msg
    assert "1.2.826.0.1.3680043.2.1125.3.1" in msg and "T1_second" in msg and "10 files" in msg


def test_dicom_series_uid_picks_one_series_of_a_mixed_folder(tmp_path, colin4):
    folder = tmp_path / "mixed"
    write_dicom_series(colin4, folder, "1.2.826.0.1.3680043.2.1125.3.1", "T1_first")
    write_dicom_series(colin4[:, :, :10], folder, "1.2.826.0.1.3680043.2.1125.3.2", "T1_second")
    assert len(list_dicom_series(folder)) == 2
    vol = read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.3.2")
    assert vol.shape[2] == 10


def test_truncated_nii_gz_is_reported_as_truncated(tmp_path):
    data = Path(colin27_t1()).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match="truncated") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_uncompressed_nifti_missing_voxels_is_reported_as_truncated(tmp_path):
    raw = gzip.decompress(Path(colin27_t1()).read_bytes())
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(VolumeReadError, match="truncated") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_garbage_file_is_reported_as_unreadable(tmp_path):
    path = tmp_path / "noise.mha"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(VolumeReadError, match="not a readable image") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_2d_image_is_refused(tmp_path, colin4):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(colin4[:, :, 20], str(path))
    with pytest.raises(VolumeReadError, match="2D") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_4d_image_is_refused_with_a_hint_to_choose_a_volume(tmp_path, colin4):
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([colin4, colin4 * 2, colin4 * 3]), str(path))
    with pytest.raises(VolumeReadError, match="4D") as err:
        read_volume(path)
    assert str(path) in str(err.value) and "volume" in str(err.value)


def test_volume_index_picks_one_volume_of_a_4d_image(tmp_path, colin4):
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([colin4, colin4 * 2]), str(path))
    vol = read_volume(path, volume_index=1)
    np.testing.assert_array_equal(vol.array, 2 * Volume.from_sitk(colin4).array)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_refused(tmp_path, colin4, bad):
    arr = Volume.from_sitk(colin4).array.astype(np.float32)
    arr[10, 10, 10] = bad
    path = write_volume(Volume(arr, colin4.GetSpacing(), colin4.GetOrigin()), tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeReadError, match="NaN" if np.isnan(bad) else "infinite") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_constant_image_is_refused(tmp_path):
    path = write_volume(Volume(np.full((20, 20, 20), 7, np.int16)), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeReadError, match="constant") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_constant_image_is_accepted_as_an_empty_label_map(tmp_path):
    path = write_volume(Volume(np.zeros((20, 20, 20), np.uint8)), tmp_path / "empty_mask.nii.gz")
    assert read_volume(path, allow_constant=True).array.max() == 0


def test_dimensions_over_the_limit_are_refused_before_decoding(tmp_path, colin4):
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(colin4, str(path))
    with pytest.raises(VolumeReadError, match="exceed the limit of 1000 voxels") as err:
        read_volume(path, max_voxels=1000)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.nii.gz"
    with pytest.raises(VolumeReadError, match="does not exist") as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_folder_without_dicom_is_refused(tmp_path):
    with pytest.raises(VolumeReadError, match="no DICOM series"):
        read_volume(tmp_path)


def test_report_is_read_as_utf8(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text("Befund: kein Hinweis auf Läsion.\n", encoding="utf-8")
    assert read_report(path) == "Befund: kein Hinweis auf Läsion.\n"


def test_non_utf8_report_names_the_file_but_not_its_text(tmp_path):
    path = tmp_path / "report.txt"
    path.write_bytes("Secret finding: Läsion".encode("latin-1"))
    with pytest.raises(ReportReadError, match="not valid UTF-8") as err:
        read_report(path)
    assert str(path) in str(err.value)
    assert "Secret" not in str(err.value)


def test_missing_report_is_named(tmp_path):
    with pytest.raises(ReportReadError, match="does not exist"):
        read_report(tmp_path / "missing.txt")
