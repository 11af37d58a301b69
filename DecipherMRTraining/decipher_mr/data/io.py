"""Reading MRI series and radiology reports, with errors a user can act on.

``read_volume`` opens NIfTI (``.nii``, ``.nii.gz``), NRRD, MHA/MHD files and DICOM series folders with
SimpleITK, FreeSurfer ``.mgz``/``.mgh``, NIfTI-2 and Philips PAR/REC with nibabel, demosaics Siemens
mosaic DICOM (:mod:`decipher_mr.data.io_formats`), and returns a :class:`~decipher_mr.data.volume.Volume` with its geometry untouched. Every
problem is a :class:`VolumeReadError` (a ``ValueError``) whose message starts with the file or folder
and says what is wrong: missing, truncated or corrupt, 2D, 4D, vector-valued, too large, NaN/Inf
voxels, constant, or a DICOM folder that mixes series.

``read_report`` reads a UTF-8 text report. Reports are patient data: nothing here ever prints, logs
or puts their text into an error message.
"""

from __future__ import annotations

import gzip
import os
import time
import zlib
from pathlib import Path

import numpy as np

from ..storage import atomic_path
from .volume import Volume

# 512^3 float32 is 512 MiB: bigger than any MRI series we expect, small enough not to exhaust memory.
DEFAULT_MAX_VOXELS = 512**3

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# DICOM tags read for the "which series?" listing.
_TAG_SERIES_DESCRIPTION = "0008|103e"


class VolumeReadError(ValueError):
    """A volume could not be read; the message names the file and the problem."""


class ReportReadError(ValueError):
    """A report could not be read; the message names the file (never its text)."""


def read_volume(
    path: str | os.PathLike,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    volume_index: int | None = None,
    allow_constant: bool = False,
) -> Volume:
    """Read one 3D MRI series from a NIfTI/NRRD/MHA file or a DICOM series folder.

    ``series_uid`` picks one series in a DICOM folder that holds several; ``volume_index`` picks one
    volume of a 4D file; ``allow_constant`` accepts a constant image (an empty label map).

    >>> vol = read_volume("sub-01/anat/sub-01_T1w.nii.gz")
    >>> vol.shape, vol.spacing
    ((181, 217, 181), (1.0, 1.0, 1.0))
    """
    import SimpleITK as sitk

    from .io_formats import is_nibabel_only, read_mosaic, read_nibabel

    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file or folder does not exist")
    if path.is_file() and is_nibabel_only(path):
        vol = read_nibabel(path, max_voxels, volume_index, VolumeReadError)
        _check_voxels(vol, path, allow_constant)
        return vol
    if path.is_dir():
        img = _read_dicom_folder(path, series_uid, max_voxels, volume_index)
    elif not path.name.lower().endswith(VOLUME_SUFFIXES) and _is_mosaic(str(path)):
        img = read_mosaic([str(path)], path, volume_index, VolumeReadError)
    else:
        _check_complete_file(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise VolumeReadError(f"{path}: not a readable image ({_first_line(exc)})") from exc
        size = tuple(reader.GetSize())
        _check_header(path, size, reader.GetNumberOfComponents(), max_voxels, volume_index)
        if reader.HasMetaDataKey("0028|0008") and len(size) == 3 and size[2] > 1:  # enhanced multi-frame DICOM
            from .io_formats import check_multiframe_geometry

            check_multiframe_geometry(str(path), VolumeReadError)
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise VolumeReadError(f"{path}: image data is corrupt or truncated ({_first_line(exc)})") from exc
        if img.GetDimension() == 4:
            img = _pick_volume(img, path, volume_index)
        _check_nifti_finite(path)
    try:
        vol = img if isinstance(img, Volume) else Volume.from_sitk(img, path=str(path))
    except ValueError as exc:
        raise VolumeReadError(str(exc)) from exc
    _check_voxels(vol, path, allow_constant)
    return vol


def read_report(path: str | os.PathLike) -> str:
    """Read a radiology report as UTF-8 text (a leading byte-order mark is dropped).

    >>> text = read_report("sub-01/report.txt")
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ReportReadError(f"{path}: report file does not exist") from exc
    except IsADirectoryError as exc:
        raise ReportReadError(f"{path}: expected a text file, found a folder") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # The offset helps a user find the bad byte; the text itself is patient data and stays out.
        raise ReportReadError(
            f"{path}: report is not valid UTF-8 (byte {exc.start} cannot be decoded); "
            "re-save it as UTF-8"
        ) from None


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in a folder: ``[{"uid", "description", "files"}]``.

    >>> [s["uid"] for s in list_dicom_series("study/")]
    """
    import SimpleITK as sitk

    folder = str(folder)
    out = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
        out.append({"uid": uid, "description": _series_description(files[0]) if files else "", "files": len(files)})
    return out


def write_dicom_series(
    volume: Volume, folder: str | os.PathLike, series_uid: str, description: str = "", modality: str = "MR"
) -> Path:
    """Write a volume as a DICOM series (one int16 file per k-slice) with the geometry tags a scanner sets.

    >>> write_dicom_series(vol, "export/T1", series_uid="1.2.826.0.1.3680043.2.1125.7", description="T1")
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    d = img.GetDirection()
    tags = {
        "0008|0060": modality,
        "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "0020|000d": series_uid + ".0",
        "0020|000e": series_uid,
        "0008|103e": description,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{img.GetSpacing()[2]:.6f}",
        "0018|5100": "HFS",
    }
    # One date and time for the whole series (left to ITK, each slice gets its own clock time, and
    # dcm2niix then splits the series slice by slice).
    now = time.strftime("%Y%m%d %H%M%S").split()
    for tag in ("0008|0020", "0008|0021"):
        tags[tag] = now[0]
    for tag in ("0008|0030", "0008|0031"):
        tags[tag] = now[1]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetSize()[2]):
        sl = img[:, :, k]
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        with atomic_path(folder / f"{description or 'slice'}_{k + 1:04d}.dcm", suffix=".dcm") as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(sl)
    return folder


# --- internals ------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    # ITK errors are multi-line with source locations; the last non-empty line carries the meaning.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    return msg[:300]


def _check_complete_file(path: Path) -> None:
    """ITK reads a truncated .nii.gz without complaint (the missing voxels come back as zeros), so
    NIfTI files are checked against the size their header promises before they are decoded."""
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        return
    if path.stat().st_size == 0:
        raise VolumeReadError(f"{path}: file is empty")
    if name.endswith(".gz"):
        available = _gzip_payload_size(path)
    else:
        available = path.stat().st_size
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise VolumeReadError(f"{path}: not a valid NIfTI header ({_first_line(exc)})") from exc
    if available < expected:
        raise VolumeReadError(
            f"{path}: file is truncated ({available} of {expected} bytes of image data present); "
            "copy or export it again"
        )


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN and Inf into 0, so float NIfTI voxels are checked on the
    raw data (nibabel) rather than on what ITK returns."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return
    import nibabel as nib

    img = nib.load(str(path))
    if not np.issubdtype(img.header.get_data_dtype(), np.floating):
        return
    raw = np.asanyarray(img.dataobj)
    finite = np.isfinite(raw)
    if not finite.all():
        n_nan = int(np.isnan(raw).sum())
        raise VolumeReadError(
            f"{path}: contains {n_nan} NaN and {int(finite.size - finite.sum()) - n_nan} infinite voxels; "
            "fix or mask them before use"
        )


def _gzip_payload_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise VolumeReadError(f"{path}: compressed file is truncated or corrupt ({exc})") from exc
    return total


def _check_header(path: Path, size: tuple[int, ...], components: int, max_voxels: int, volume_index: int | None) -> None:
    dims = "x".join(str(n) for n in size)
    if components != 1:
        raise VolumeReadError(f"{path}: has {components} values per voxel (colour or vector image); expected a scalar MRI")
    if len(size) == 2 or (len(size) == 3 and min(size) == 1):
        hint = "; give the folder of the whole DICOM series instead" if path.suffix.lower() == ".dcm" else ""
        raise VolumeReadError(f"{path}: is a 2D image ({dims}); expected a 3D volume{hint}")
    if len(size) == 4 and size[3] > 1 and volume_index is None:
        raise VolumeReadError(
            f"{path}: is 4D ({dims}: {size[3]} volumes); choose one volume "
            "(read_volume(..., volume_index=N), or extract it first, e.g. `fslroi in out N 1`)"
        )
    if len(size) not in (3, 4):
        raise VolumeReadError(f"{path}: is {len(size)}D ({dims}); expected a 3D volume")
    n = int(np.prod(size[:3], dtype=np.int64))
    if n > max_voxels:
        raise VolumeReadError(
            f"{path}: dimensions {dims} ({n} voxels) exceed the limit of {max_voxels} voxels; "
            "raise --max-voxels if this is intended"
        )


def _pick_volume(img, path: Path, volume_index: int | None):
    import SimpleITK as sitk

    size = list(img.GetSize())
    index = 0 if volume_index is None else int(volume_index)
    if not 0 <= index < size[3]:
        raise VolumeReadError(f"{path}: volume_index {index} is out of range (the file has {size[3]} volumes)")
    return sitk.Extract(img, size[:3] + [0], [0, 0, 0, index])


def _check_voxels(vol: Volume, path: Path, allow_constant: bool) -> None:
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            raise VolumeReadError(
                f"{path}: contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxels; "
                "fix or mask them before use"
            )
    if not allow_constant and arr.size and arr.min() == arr.max():
        raise VolumeReadError(f"{path}: image is constant (every voxel is {arr.flat[0]}); nothing to learn from")


def _series_description(filename: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData(_TAG_SERIES_DESCRIPTION).strip() if reader.HasMetaDataKey(_TAG_SERIES_DESCRIPTION) else ""
    except RuntimeError:
        return ""


def _is_mosaic(filename: str) -> bool:
    """Siemens mosaic: ImageType holds MOSAIC (read from the header only)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return reader.HasMetaDataKey("0008|0008") and "MOSAIC" in reader.GetMetaData("0008|0008").upper()


def _read_dicom_folder(folder: Path, series_uid: str | None, max_voxels: int, volume_index: int | None = None):
    import SimpleITK as sitk

    from .io_formats import check_multiframe_geometry, read_mosaic

    series = list_dicom_series(folder)
    if not series:
        raise VolumeReadError(f"{folder}: folder holds no DICOM series (and is not a single image file)")
    choices = "; ".join(f"{s['uid']} ({s['description'] or 'no description'}, {s['files']} files)" for s in series)
    if series_uid is None:
        if len(series) > 1:
            raise VolumeReadError(
                f"{folder}: DICOM folder mixes {len(series)} series; choose one with series_uid "
                f"(--series-uid): {choices}"
            )
        series_uid = series[0]["uid"]
    elif series_uid not in {s["uid"] for s in series}:
        raise VolumeReadError(f"{folder}: no DICOM series with UID {series_uid}; the folder holds: {choices}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    probe = sitk.ImageFileReader()
    probe.SetFileName(files[0])
    try:
        probe.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(f"{files[0]}: unreadable DICOM file ({_first_line(exc)})") from exc
    if probe.HasMetaDataKey("0008|0008") and "MOSAIC" in probe.GetMetaData("0008|0008").upper():
        return read_mosaic(list(files), folder, volume_index, VolumeReadError)
    frames = probe.GetSize()[2] if len(probe.GetSize()) > 2 else 1
    if frames > 1:  # enhanced multi-frame: one file holds the whole volume, with per-frame geometry
        if len(files) > 1:
            raise VolumeReadError(
                f"{folder}: series {series_uid} holds {len(files)} multi-frame files; "
                "convert it with dcm2niix (decipher-mr manifest --convert) and read the NIfTI"
            )
        _check_header(folder, tuple(probe.GetSize()), probe.GetNumberOfComponents(), max_voxels, None)
        check_multiframe_geometry(files[0], VolumeReadError)
        try:
            return sitk.ReadImage(files[0])
        except RuntimeError as exc:
            raise VolumeReadError(f"{files[0]}: multi-frame DICOM could not be read ({_first_line(exc)})") from exc
    size = tuple(probe.GetSize()[:2]) + (len(files),)
    _check_header(folder, size, probe.GetNumberOfComponents(), max_voxels, None)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(f"{folder}: DICOM series {series_uid} could not be read ({_first_line(exc)})") from exc
