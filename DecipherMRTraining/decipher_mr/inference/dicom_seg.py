"""Segmentations as DICOM Segmentation objects (highdicom), one coded segment per label.

Each foreground label of the head becomes a segment whose segmented property category and type are
the coded concepts of the bundle's label table (:mod:`decipher_mr.bundle.codes`; an old bundle gets the
codes of known structure names, else Tissue/Tissue), so PACS viewers, OHIF and 3D Slicer show the
proper names. The SEG references its source series:

* input read from a DICOM series folder: that series' own instances (read with pydicom), matched to
  the label map's slices by their position, so the SEG frames sit exactly on the source images;
* any other input (NIfTI, NRRD, ...): the input is first written as an MR DICOM series
  (``<name>-source-dicom/``, int16) in the same geometry, and the SEG references that series.

>>> write_dicom_seg(seg.labels, bundle.labels["lobes"], "out/segmentation.dcm", source="study/T1/")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from decipher_mr.bundle.codes import label_codes
from decipher_mr.data.volume import Volume
from decipher_mr.storage import atomic_path

POSITION_TOL_MM = 0.05


class DicomSegError(ValueError):
    """The segmentation cannot be written as a DICOM-SEG referencing its source (the message says why)."""


def _code(triplet):
    from pydicom.sr.coding import Code

    scheme, value, meaning = triplet
    return Code(value, scheme, meaning)


def read_source_series(folder: str | os.PathLike) -> list:
    """The DICOM instances of one image series in ``folder`` (pydicom datasets without pixel data)."""
    import pydicom

    folder = Path(folder)
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not part of the series
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise DicomSegError(f"{folder}: holds no DICOM image with a position and orientation to reference")
    series = {ds.SeriesInstanceUID for ds in datasets}
    if len(series) > 1:
        raise DicomSegError(f"{folder}: mixes {len(series)} DICOM series; a SEG references exactly one")
    return datasets


def match_frames(labels: Volume, datasets: Sequence) -> list[tuple[int, Any]]:
    """``[(k, dataset)]``: the slice index of ``labels`` each source instance lies on, sorted by ``k``.

    Refuses (clearly) when the source images do not sit on the label map's grid: another orientation,
    pixel size or in-plane offset, or a slice between the label map's slices.
    """
    inv = np.linalg.inv(labels.affine_lps)
    d = labels.direction
    ni, nj, nk = labels.shape
    out, seen = [], set()
    for ds in datasets:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        if not (np.allclose(iop[:3], d[:, 0], atol=1e-3) and np.allclose(iop[3:], d[:, 1], atol=1e-3)):
            raise DicomSegError(f"source instance {ds.SOPInstanceUID}: orientation {iop.round(4).tolist()} differs from "
                                f"the segmentation's row/column directions {d[:, 0].round(4).tolist()}, "
                                f"{d[:, 1].round(4).tolist()}")
        if (int(ds.Columns), int(ds.Rows)) != (ni, nj):
            raise DicomSegError(f"source instance {ds.SOPInstanceUID}: {ds.Columns}x{ds.Rows} pixels, the "
                                f"segmentation has {ni}x{nj}")
        ijk = inv @ np.append(np.asarray(ds.ImagePositionPatient, float), 1.0)
        k = int(round(ijk[2]))
        off_mm = np.abs(ijk[:3] - [0, 0, k]) * np.asarray(labels.spacing)
        if off_mm.max() > POSITION_TOL_MM or not 0 <= k < nk:
            raise DicomSegError(f"source instance {ds.SOPInstanceUID}: position {list(ds.ImagePositionPatient)} is not "
                                f"on a slice of the segmentation's grid")
        if k in seen:
            raise DicomSegError(f"source series has two instances on slice {k}")
        seen.add(k)
        out.append((k, ds))
    return sorted(out, key=lambda t: t[0])


def _segment_descriptions(codes, head: str, algorithm: Mapping[str, str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.get("name", f"DecipherMR {head}")[:64],
        family=dcm_codes.cid7162.ArtificialIntelligence,
        version=algorithm.get("version", "unknown")[:64],
    )
    return [hd.seg.SegmentDescription(
        segment_number=n, segment_label=c.name[:64],
        segmented_property_category=_code(c.category), segmented_property_type=_code(c.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=ident,
        tracking_id=f"{head}:{c.index}"[:64], tracking_uid=hd.UID(),
    ) for n, c in enumerate(codes, start=1)]


def write_dicom_seg(labels: Volume, label_rows: Sequence[Mapping[str, Any]], dest: str | os.PathLike,
                    source: str | os.PathLike | Sequence | None = None, head: str = "segmentation",
                    algorithm: Mapping[str, str] | None = None, series_description: str | None = None) -> Path:
    """Write the label map ``labels`` as a DICOM-SEG at ``dest`` and return its path.

    ``label_rows`` is the head's label table (``index``, ``name``, optional ``category``/``type``);
    ``source`` the DICOM series folder (or its pydicom datasets) that the SEG references. Without one,
    the label map's own geometry is written as an MR series beside ``dest`` and referenced.
    """
    try:
        import highdicom as hd
    except ImportError as exc:
        raise DicomSegError("writing DICOM-SEG needs highdicom (pip install 'decipher-mr[dicom]')") from exc

    dest = Path(dest)
    if source is None or (isinstance(source, (str, os.PathLike)) and not Path(source).is_dir()):
        source = _write_reference_series(labels, source, dest)
    datasets = read_source_series(source) if isinstance(source, (str, os.PathLike)) else list(source)
    frames = match_frames(labels, datasets)
    if not all("FrameOfReferenceUID" in ds for _, ds in frames):
        raise DicomSegError(f"{source if isinstance(source, (str, os.PathLike)) else 'source series'}: the DICOM "
                            "images have no FrameOfReferenceUID, which a DICOM-SEG must reference")
    codes = label_codes(label_rows, where=f"head {head} label table")
    if not codes:
        raise DicomSegError(f"head {head}: its label table names no foreground label to export")
    lut = np.zeros(max(int(labels.array.max(initial=0)), max(c.index for c in codes)) + 1, np.uint8)
    for n, c in enumerate(codes, start=1):
        lut[c.index] = n  # segment numbers 1..N in table order; values the table does not name -> 0
    arr = np.asarray(labels.array)
    if arr.min(initial=0) < 0:
        raise DicomSegError("segmentation holds negative labels")
    pixels = np.stack([lut[arr[:, :, k].T] for k, _ in frames])  # frame = (rows=j, columns=i)
    algorithm = dict(algorithm or {})
    for _, ds in frames:  # in memory only: highdicom then takes the slice spacing from the positions, as we do
        if "SpacingBetweenSlices" in ds:  # (SimpleITK/GDCM writers put the 2D slice's 1 mm here)
            del ds.SpacingBetweenSlices
    seg = hd.seg.Segmentation(
        source_images=[ds for _, ds in frames],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(codes, head, algorithm),
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="DecipherMR", manufacturer_model_name=algorithm.get("model", "DecipherMR")[:64],
        software_versions=algorithm.get("version", "unknown")[:64], device_serial_number="0",
        series_description=(series_description or f"DecipherMR {head}")[:64],
        omit_empty_frames=False,
    )
    with atomic_path(dest, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return dest


def _write_reference_series(labels: Volume, source, dest: Path) -> Path:
    """The input (or, without it, the label map's grid) as an MR DICOM series for the SEG to reference."""
    from pydicom.uid import generate_uid

    from decipher_mr.data.io import read_volume, write_dicom_series

    image = labels.with_array(np.zeros(labels.shape, np.int16))
    if source is not None and Path(source).is_file():
        vol = read_volume(source)
        if not vol.same_geometry(labels):
            raise DicomSegError(f"{source}: the input's grid differs from the segmentation's")
        image = vol
    folder = dest.parent / f"{dest.name[: -len('.dcm')] if dest.name.endswith('.dcm') else dest.name}-source-dicom"
    if folder.is_dir():  # a rerun: keep the series the earlier SEG may already reference
        try:
            read_source_series(folder)
            return folder
        except DicomSegError:
            pass
    write_dicom_series(image, folder, series_uid=generate_uid()[:54].rstrip("."), description="source")
    _complete_series(folder)
    return folder


def _complete_series(folder: Path) -> None:
    """Give a written series what the MR image IOD (and a SEG referencing it) needs: one frame of reference."""
    import pydicom
    from pydicom.uid import generate_uid

    frame_of_reference = generate_uid()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.SpacingBetweenSlices = ds.SliceThickness  # SimpleITK writes the 2D slice's 1 mm here
        for keyword, value in (("PatientID", "DECIPHER-MR"), ("PatientName", "Anonymous^"), ("SeriesNumber", 1)):
            if not ds.get(keyword):
                setattr(ds, keyword, value)
        with atomic_path(path, suffix=".dcm") as tmp:
            ds.save_as(tmp)


def write_dicom_segs(session, volume: Volume, results: Mapping[str, Any], dest: str | os.PathLike,
                     source: str | os.PathLike | None = None) -> list[Path]:
    """A DICOM-SEG ``<dest>/<name>.dcm`` for every segmentation in ``results`` (``infer --dicom-seg``)."""
    from decipher_mr import __version__

    from .results import SegmentationResult

    written = []
    name_of_bundle = str(session.bundle.config.get("name") or Path(str(session.bundle.source)).name)
    for name, res in results.items():
        if not isinstance(res, SegmentationResult):
            continue
        rows = session.bundle.labels.get(res.head) or [{"index": i, "name": n} for i, n in enumerate(res.label_names)]
        algorithm = {"name": f"DecipherMR {res.head}", "version": f"{__version__} {session.fingerprint[:12]}",
                     "model": name_of_bundle}
        out = write_dicom_seg(res.labels, rows, Path(dest) / f"{name}.dcm", source=source, head=res.head,
                              algorithm=algorithm)
        written.append(out)
        ref = out.parent / f"{name}-source-dicom"
        if ref.is_dir():
            written += sorted(ref.iterdir())
    return written
