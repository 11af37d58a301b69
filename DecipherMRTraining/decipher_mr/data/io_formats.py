"""Readers for the MRI formats SimpleITK does not handle, all through nibabel, with exact geometry.

* FreeSurfer ``.mgz`` / ``.mgh``, NIfTI-2 (``.nii``/``.nii.gz``/``.hdr`` pairs whose header is 540 bytes),
  Philips ``.PAR``/``.REC``: nibabel's ``img.affine`` (voxel → RAS mm) becomes the volume's geometry
  (LPS, see :mod:`decipher_mr.data.volume`) unchanged; a 4D file needs ``volume_index``.
* Siemens mosaic DICOM (one file = one 3D volume tiled in a 2D image, fMRI/DWI): demosaiced with
  ``nibabel.nicom`` from the CSA header; a folder of mosaic files is a 4D series (``volume_index`` picks
  one). A mosaic that cannot be demosaiced is refused: it is never returned as a 2D tile sheet.

Every problem raises :class:`~decipher_mr.data.io.VolumeReadError` naming the file.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np

from .volume import LPS_TO_RAS, Volume

NIBABEL_SUFFIXES = (".mgz", ".mgh", ".par", ".rec")
_NIFTI2_SIZEOF_HDR = 540


def is_nibabel_only(path: Path) -> bool:
    """Whether ``path`` is a format read by nibabel here (MGH/MGZ, PAR/REC, NIfTI-2)."""
    name = path.name.lower()
    if name.endswith(NIBABEL_SUFFIXES):
        return True
    if name.endswith((".nii", ".nii.gz", ".hdr")):
        return _is_nifti2(path)
    return False


def _is_nifti2(path: Path) -> bool:
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
    except (OSError, EOFError):
        return False
    if len(head) < 4:
        return False
    return int.from_bytes(head, "little") == _NIFTI2_SIZEOF_HDR or int.from_bytes(head, "big") == _NIFTI2_SIZEOF_HDR


def read_nibabel(path: Path, max_voxels: int, volume_index: int | None, error) -> Volume:
    """Read an MGH/MGZ, NIfTI-2 or PAR/REC file; ``error`` is the exception class to raise."""
    import nibabel as nib

    if path.suffix.lower() == ".rec":
        par = path.with_suffix(".PAR") if path.with_suffix(".PAR").exists() else path.with_suffix(".par")
        path = par
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
    except FileNotFoundError as exc:
        raise error(f"{path}: a file it needs is missing ({exc.filename}); PAR needs its REC, .hdr its .img") from exc
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise error(f"{path}: not a readable {_kind(path)} file ({_short(exc)})") from exc
    shape = tuple(int(n) for n in img.shape)
    dims = "x".join(str(n) for n in shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3 or min(shape[:3]) == 1:
        raise error(f"{path}: is a 2D image ({dims}); expected a 3D volume")
    if len(shape) > 4:
        raise error(f"{path}: is {len(shape)}D ({dims}); expected a 3D volume")
    if len(shape) == 4 and volume_index is None:
        raise error(
            f"{path}: is 4D ({dims}: {shape[3]} volumes); choose one volume (read_volume(..., volume_index=N))"
        )
    n = int(np.prod(shape[:3], dtype=np.int64))
    if n > max_voxels:
        raise error(f"{path}: dimensions {dims} ({n} voxels) exceed the limit of {max_voxels} voxels")
    try:
        if len(shape) == 4:
            if not 0 <= int(volume_index) < shape[3]:
                raise error(f"{path}: volume_index {volume_index} is out of range (the file has {shape[3]} volumes)")
            data = np.asanyarray(img.dataobj[..., int(volume_index)])
        else:
            data = np.asanyarray(img.dataobj).reshape(shape)
    except error:
        raise
    except Exception as exc:
        raise error(f"{path}: image data is corrupt or truncated ({_short(exc)})") from exc
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    return volume_from_affine(np.ascontiguousarray(data), np.asarray(img.affine, float), path, ras=True, error=error)


def volume_from_affine(array: np.ndarray, affine: np.ndarray, path: Path, ras: bool, error) -> Volume:
    """A :class:`Volume` from a 4×4 voxel → world matrix (RAS when ``ras``, else DICOM LPS).

    The grid must be orthogonal (a rotation times voxel sizes): a sheared grid cannot be resampled
    faithfully by ITK, so it is refused rather than silently squared up.
    """
    m = np.asarray(affine, float)[:3, :4]
    if ras:
        m = LPS_TO_RAS @ m
    spacing = np.linalg.norm(m[:, :3], axis=0)
    if not np.all(np.isfinite(m)) or np.any(spacing <= 0):
        raise error(f"{path}: the voxel-to-world matrix is degenerate ({np.round(affine, 4).tolist()})")
    direction = m[:, :3] / spacing
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-3):
        raise error(
            f"{path}: the voxel grid is sheared (axes not orthogonal, affine {np.round(affine, 4).tolist()}); "
            "resample it to an orthogonal grid first (e.g. mri_convert or nibabel.processing.resample_from_to)"
        )
    try:
        return Volume(array=array, spacing=tuple(spacing), origin=tuple(m[:, 3]), direction=direction, path=str(path))
    except ValueError as exc:
        raise error(str(exc)) from exc


# --- Siemens mosaic DICOM -------------------------------------------------------------------
def read_mosaic(files: list[str], where: Path, volume_index: int | None, error) -> Volume:
    """Demosaic Siemens mosaic files (each one 3D volume) with nibabel's CSA-header reader."""
    try:
        import pydicom  # noqa: F401  (nibabel.nicom needs it)

        with warnings.catch_warnings():  # nibabel warns that its DICOM readers are experimental
            warnings.simplefilter("ignore")
            from nibabel.nicom import dicomwrappers
    except ImportError as exc:
        raise error(
            f"{where}: is a Siemens mosaic DICOM series; reading it needs pydicom (pip install pydicom), "
            "or convert it first with dcm2niix"
        ) from exc
    wrappers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                w = dicomwrappers.wrapper_from_file(f)
            except Exception as exc:
                raise error(f"{f}: unreadable mosaic DICOM file ({_short(exc)})") from exc
            if not getattr(w, "is_mosaic", False):
                raise error(f"{f}: the series mixes mosaic and non-mosaic images; convert it with dcm2niix")
            wrappers.append(w)
    wrappers.sort(key=lambda w: (_num(w.get("AcquisitionNumber")), _num(w.get("InstanceNumber"))))
    n = len(wrappers)
    if n > 1 and volume_index is None:
        raise error(
            f"{where}: is a Siemens mosaic series of {n} volumes (fMRI/DWI time points, "
            f"each {'x'.join(str(s) for s in wrappers[0].image_shape)}); choose one volume "
            "(read_volume(..., volume_index=N))"
        )
    index = 0 if volume_index is None else int(volume_index)
    if not 0 <= index < n:
        raise error(f"{where}: volume_index {index} is out of range (the mosaic series has {n} volumes)")
    w = wrappers[index]
    name = getattr(w.dcm_data, "filename", None) or str(where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            affine = np.asarray(w.affine, float)
            data = np.asarray(w.get_data())
        except Exception as exc:
            raise error(
                f"{name}: is a Siemens mosaic that cannot be demosaiced ({_short(exc)}); it is not read as a "
                "flat tile sheet. Convert it with dcm2niix and read the NIfTI"
            ) from exc
    if data.ndim != 3 or min(data.shape) < 2:
        raise error(f"{name}: demosaiced to shape {data.shape}, not a 3D volume; convert it with dcm2niix")
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    return volume_from_affine(np.ascontiguousarray(data), affine, where, ras=False, error=error)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".mgz", ".mgh")):
        return "FreeSurfer MGH"
    if name.endswith((".par", ".rec")):
        return "Philips PAR/REC"
    return "NIfTI-2"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# --- enhanced multi-frame DICOM -------------------------------------------------------------
def check_multiframe_geometry(filename: str, error) -> None:
    """Refuse an enhanced (multi-frame) MR file whose frames do not form one regular 3D grid.

    SimpleITK/GDCM read the first frame's position and orientation; that is right only when every frame
    shares one orientation and the positions step evenly along the slice normal. A file with no plane
    position/orientation at all would come back with an invented 1 mm identity grid: refused too.
    """
    try:
        import pydicom
    except ImportError:
        return  # nothing better to check with; GDCM's geometry is used as is
    try:
        ds = pydicom.dcmread(filename, stop_before_pixels=True)
    except Exception as exc:
        raise error(f"{filename}: unreadable DICOM file ({_short(exc)})") from exc
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []

    def item(group, keyword):
        for source in (group, shared):
            seq = source.get(keyword) if source is not None else None
            if seq:
                return seq[0]
        return None

    orients, positions = [], []
    for group in frames:
        o, p = item(group, "PlaneOrientationSequence"), item(group, "PlanePositionSequence")
        if o is None or p is None or "ImageOrientationPatient" not in o or "ImagePositionPatient" not in p:
            break
        orients.append(np.asarray(o.ImageOrientationPatient, float))
        positions.append(np.asarray(p.ImagePositionPatient, float))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if len(positions) != n or n == 0:
        raise error(
            f"{filename}: multi-frame DICOM without a plane position and orientation for each of its {n} "
            "frames; its geometry is unknown, so it is not read (convert it with dcm2niix if it has one)"
        )
    if not all(np.allclose(o, orients[0], atol=1e-4) for o in orients):
        raise error(f"{filename}: frames have different orientations (e.g. a 3-plane localiser); not one volume")
    normal = np.cross(orients[0][:3], orients[0][3:])
    steps = np.diff(np.sort(np.asarray(positions) @ normal))
    if n > 1 and (steps.min() <= 1e-4 or steps.max() - steps.min() > 0.01 * max(steps.max(), 1e-6)):
        raise error(
            f"{filename}: frames are not evenly spaced along the slice normal (steps {steps.min():.3f}.."
            f"{steps.max():.3f} mm; several stacks or time points?); convert it with dcm2niix"
        )
