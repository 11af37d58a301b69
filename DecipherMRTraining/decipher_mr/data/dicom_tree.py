"""Manifest rows from a DICOM tree (a PACS export in any folder layout), read with pydicom.

Files are grouped by SeriesInstanceUID. Skipped, each with a count and a reason: non-image objects (SR,
PR, KO, RT*, ... and anything without pixels), localisers (ImageType LOCALIZER, scout/survey names, or
frames in several orientations) and series too thin to be a volume (< ``min_slices`` slices). Sequence
and body region are *proposed* from the tags and shown for review (``row["proposed_from"]``).

A series whose files all lie in one folder gets ``image`` = that folder and ``series_uid`` (read_volume
picks the series); a series spread over folders, or any series when ``convert_to`` is given, is converted
with dcm2niix to one NIfTI (see the README for why dcm2niix rather than SimpleITK).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from .scan_result import ScanResult, safe_id

_TAGS = ["SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID",
         "SeriesDescription", "ProtocolName", "SeriesNumber", "ImageType", "ScanningSequence", "SequenceVariant",
         "RepetitionTime", "EchoTime", "InversionTime", "BodyPartExamined", "StudyDescription", "Rows",
         "Columns", "NumberOfFrames", "ImageOrientationPatient", "MRAcquisitionType"]
_NON_IMAGE = {"SR": "structured report (SR)", "PR": "presentation state (PR)", "KO": "key object selection (KO)",
              "RTSTRUCT": "RT object", "RTPLAN": "RT object", "RTDOSE": "RT object", "RTRECORD": "RT object",
              "RTIMAGE": "RT object", "REG": "registration (REG)", "DOC": "document (DOC)", "SEG": "segmentation (SEG)"}
_LOCALISER = re.compile(r"locali[sz]er|scout|survey|3[-_ ]?pl(ane)?|tri[-_ ]?pilot|aahead|\bloc\b", re.I)
_SEQ_WORDS = [  # (pattern on description/protocol, sequence) - first hit wins, most specific first
    (r"flair|\bdark[-_ ]?fluid", "FLAIR"), (r"\bswi\b|susceptib", "SWI"), (r"\badc\b|apparent", "ADC"),
    (r"dwi|diff|\bdti\b|\btrace\b|ep2d_diff", "DWI"), (r"t2\s*\*|t2star|\bgre\b.*t2|\bt2\*?[-_ ]?gre|hemo", "T2starw"),
    (r"\bpd\b|proton|pdw|pd[-_]", "PDw"), (r"t2|tse|haste|space", "T2w"),
    (r"t1|mprage|mp-rage|tfl3d|spgr|bravo|vibe|flash|tfe", "T1w"), (r"tof|angio|\bmra\b", "angio"),
    (r"bold|fmri|ep2d_bold|resting", "bold")]
_REGIONS = [  # (pattern on BodyPartExamined / descriptions, body region)
    (r"brain|head|neuro|skull|cerebr|\bhd\b|\biac\b|pituitar|orbit", "brain"), (r"c[-_ ]?spine|cervical", "spine"),
    (r"t[-_ ]?spine|l[-_ ]?spine|spine|lumbar|thoracic spine|sacr", "spine"), (r"prostat", "prostate"),
    (r"breast", "breast"), (r"liver|hepat", "liver"), (r"abd|abdomen|pancrea|kidney|renal|mrcp", "abdomen"),
    (r"pelvi|uter|rect|hip", "pelvis"), (r"knee", "knee"), (r"shoulder", "shoulder"), (r"neck", "neck"),
    (r"cardiac|heart|chest|thorax", "chest")]


def scan_dicom(root: str | os.PathLike, min_slices: int = 10, default_region: str | None = None,
               convert_to: str | os.PathLike | None = None, progress: bool = False) -> ScanResult:
    """Scan a DICOM tree into manifest rows (one per image series).

    >>> result = scan_dicom("pacs_export/", convert_to="pacs_nifti/")
    >>> result.skipped
    Counter({'structured report (SR)': 2, 'localiser': 1})
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover
        raise ValueError("reading a DICOM tree needs pydicom: pip install 'decipher-mr[data]'") from exc

    root = Path(root).resolve()
    result = ScanResult(kind="dicom", root=str(root))
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="DICOM files", unit="file")
    series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path in iterator:
        if path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except InvalidDicomError:
            if path.suffix.lower() in (".dcm", ".ima", ".dicom"):
                result.problems.append(f"{path}: not a DICOM file (no DICM header); skipped")
            else:
                result.skipped["not DICOM (other files)"] += 1
            continue
        except Exception as exc:
            result.problems.append(f"{path}: unreadable DICOM ({' '.join(str(exc).split())[:200]}); skipped")
            continue
        modality = str(ds.get("Modality", "")).upper()
        if modality in _NON_IMAGE or "Rows" not in ds:
            result.skipped[_NON_IMAGE.get(modality, f"non-image object ({modality or 'no modality'})")] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            result.problems.append(f"{path}: image without a SeriesInstanceUID; skipped")
            continue
        series[uid].append((path, ds))
    for uid, members in sorted(series.items(), key=lambda kv: str(kv[1][0][0])):
        row = _series_row(uid, members, min_slices, default_region, result)
        if row is not None:
            result.rows.append(row)
    if convert_to is not None or any(r.get("_spread") for r in result.rows):
        _convert_rows(result, Path(convert_to) if convert_to is not None else None)
    result.rows.sort(key=lambda r: (r["study_id"], r["id"]))
    return result


def _series_row(uid: str, members: list, min_slices: int, default_region: str | None, result: ScanResult):
    first = members[0][1]
    desc = str(first.get("SeriesDescription", "") or first.get("ProtocolName", "") or "")
    label = f"series {first.get('SeriesNumber', '?')} '{desc}' ({members[0][0].parent})"
    image_type = [str(t).upper() for t in (first.get("ImageType") or [])]
    orientations = {tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
                    for _, ds in members if ds.get("ImageOrientationPatient")}
    if "LOCALIZER" in image_type or _LOCALISER.search(desc) or len(orientations) > 1:
        why = "ImageType LOCALIZER" if "LOCALIZER" in image_type else (
            f"name '{desc}'" if _LOCALISER.search(desc) else f"{len(orientations)} slice orientations")
        result.skipped["localiser"] += 1
        result.notes.append(f"skipped {label}: localiser ({why})")
        return None
    mosaic = "MOSAIC" in image_type
    frames = int(first.get("NumberOfFrames", 1) or 1)
    slices = frames if len(members) == 1 else len(members)
    if not mosaic and slices < min_slices:
        result.skipped["too thin to be a volume"] += 1
        result.notes.append(f"skipped {label}: {slices} slice(s), fewer than {min_slices}")
        return None
    sequence, seq_why = propose_sequence(first)
    region, region_why = propose_region(first)
    folders = {p.parent for p, _ in members}
    study_uid = str(first.get("StudyInstanceUID", "") or "")
    accession = str(first.get("AccessionNumber", "") or "")
    row: dict[str, Any] = {
        "image": str(next(iter(folders))),
        "id": safe_id(f"{accession or study_uid[-12:] or 'study'}_s{first.get('SeriesNumber', '')}_{desc or 'series'}"),
        "series_uid": uid,
        "study_id": safe_id(accession or study_uid or "study"),
        "study_uid": study_uid,
        "files": len(members),
        "proposed_from": {"sequence": seq_why, "body_region": region_why or ("default" if default_region else "")},
    }
    if accession:
        row["accession_number"] = accession
    if first.get("PatientID"):
        row["patient_id"] = str(first.PatientID)
    if sequence:
        row["sequence"] = sequence
    if region or default_region:
        row["body_region"] = region or default_region
    if mosaic:
        row["mosaic_volumes"] = len(members)
    if len(folders) > 1:
        row["_spread"] = sorted(str(f) for f in folders)
    result.notes.append(f"{label}: sequence {sequence or '?'} ({seq_why}), region {row.get('body_region') or '?'}"
                        f" ({row['proposed_from']['body_region'] or 'no tag'})")
    return row


def propose_sequence(ds) -> tuple[str | None, str]:
    """(sequence, why) from SeriesDescription/ProtocolName, else from ScanningSequence and TR/TE/TI."""
    for key in ("SeriesDescription", "ProtocolName"):
        text = str(ds.get(key, "") or "")
        for pattern, seq in _SEQ_WORDS:
            if re.search(pattern, text, re.I):
                return seq, f"{key} '{text}'"
    scanning = "\\".join(str(s) for s in (ds.get("ScanningSequence") or []))
    if not isinstance(ds.get("ScanningSequence"), (list, tuple)) and ds.get("ScanningSequence"):
        scanning = str(ds.get("ScanningSequence"))
    tr, te, ti = (_float(ds.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    why = f"ScanningSequence {scanning or '?'}, TR {tr}, TE {te}, TI {ti}"
    if "IR" in scanning and ti and ti > 1500:
        return "FLAIR", why
    if "EP" in scanning and "DIFFUSION" in "\\".join(str(t) for t in (ds.get("ImageType") or [])).upper():
        return "DWI", why
    if tr and te:
        if tr < 1000 and te < 30:
            return "T1w", why
        if tr > 2000 and te > 70:
            return "T2w", why
        if tr > 1500 and te < 40:
            return "PDw", why
    return None, why + " (no rule matched)"


def propose_region(ds) -> tuple[str | None, str]:
    """(body region, why) from BodyPartExamined, else the series/study description."""
    for key in ("BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName"):
        text = str(ds.get(key, "") or "")
        for pattern, region in _REGIONS:
            if text and re.search(pattern, text, re.I):
                return region, f"{key} '{text}'"
    return None, ""


def _convert_rows(result: ScanResult, out: Path | None) -> None:
    """Convert series to NIfTI with dcm2niix: all rows when ``out`` is given, else the spread ones
    (which are then reported as problems: they need ``--convert``)."""
    keep = []
    for row in result.rows:
        spread = row.pop("_spread", None)
        if out is None:
            if spread:
                result.problems.append(f"series {row['series_uid']}: its files lie in {len(spread)} folders "
                                       f"({', '.join(spread[:3])}...); rerun with --convert DIR")
                result.skipped["spread over folders (needs --convert)"] += 1
                continue
            keep.append(row)
            continue
        try:
            row["source_folder"] = row["image"]
            row["image"] = str(convert_series(row, spread or [], out))
            keep.append(row)
        except RuntimeError as exc:
            result.problems.append(str(exc))
            result.skipped["conversion failed"] += 1
    result.rows = keep


def convert_series(row: dict, spread: list[str], out: Path) -> Path:
    """One series to ``<out>/<id>.nii.gz`` with dcm2niix (files linked into a scratch folder first)."""
    import pydicom

    try:
        import dcm2niix
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("converting needs dcm2niix: pip install 'decipher-mr[data]'") from exc
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{row['id']}.nii.gz"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="dmr-dcm-") as tmp:
        src, res = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir(), res.mkdir()
        n = 0
        for folder in sorted({Path(row["image"]), *(Path(p) for p in spread)}):
            for p in folder.iterdir():
                if p.is_file():
                    try:
                        uid = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get("SeriesInstanceUID")
                    except Exception:
                        continue
                    if uid == row["series_uid"]:
                        os.symlink(p, src / f"{n:06d}.dcm")
                        n += 1
        proc = subprocess.run([dcm2niix.bin, "-z", "y", "-b", "n", "-f", "%s", "-o", str(res), str(src)],
                              capture_output=True, text=True)
        made = sorted(res.glob("*.nii.gz"))
        if proc.returncode != 0 or len(made) != 1:
            raise RuntimeError(f"series {row['series_uid']} ({row['image']}): dcm2niix made {len(made)} NIfTI files "
                               f"(exit {proc.returncode}); convert it by hand")
        shutil.move(str(made[0]), dest)
    return dest


def _float(value) -> float | None:
    try:
        return round(float(value), 1)
    except (TypeError, ValueError):
        return None
