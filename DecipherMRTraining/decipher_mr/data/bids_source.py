"""Manifest rows from a BIDS dataset, read and validated with pybids (and its ``bids-validator`` rules).

Every anatomical image ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` becomes one row:

* ``sequence`` from the BIDS suffix (``T1w``, ``T2w``, ``FLAIR``, ``PDw``, ``T2starw``, ...);
* ``body_region`` from the sidecar's ``BodyPart`` where present (else ``default_region``);
* acquisition details from the JSON sidecars (with BIDS inheritance, resolved by pybids) under
  ``acquisition``; the BIDS entities under ``bids``; the participant's row of ``participants.tsv``
  under ``participant``;
* ``split`` from the dataset's own split when it has one: a ``split`` column in ``participants.tsv``
  or in a ``sub-*/sub-*_sessions.tsv`` (values train/val/test; training/validation/testing accepted);
* ``study_id`` = ``sub-X`` or ``sub-X_ses-Y``.

Files under ``sub-*`` whose names are not valid BIDS are reported (each by name), not silently dropped.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from .scan_result import ScanResult, safe_id

ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "T1map", "T2map", "PDT2", "inplaneT1", "inplaneT2",
                 "angio", "UNIT1", "MP2RAGE", "T2starmap", "MTw", "PD", "T1rho")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_SIDECAR_KEYS = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength", "SeriesDescription",
                 "ProtocolName", "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "RepetitionTime",
                 "EchoTime", "InversionTime", "FlipAngle", "SliceThickness")


class BIDSSourceError(ValueError):
    """The folder is not a BIDS dataset pybids can read; the message says why."""


def scan_bids(root: str | os.PathLike, default_region: str | None = None, validate: bool = True,
              progress: bool = False) -> ScanResult:
    """Scan a BIDS dataset into manifest rows.

    >>> result = scan_bids("ds000001")
    >>> result.rows[0]["sequence"], result.rows[0]["study_id"]
    ('T1w', 'sub-01')
    """
    try:
        from bids import BIDSLayout
        from bids_validator import BIDSValidator
    except ImportError as exc:  # pragma: no cover - the data extra installs them
        raise BIDSSourceError("reading BIDS needs pybids: pip install 'decipher-mr[data]'") from exc

    root = Path(root).resolve()
    result = ScanResult(kind="bids", root=str(root))
    if not (root / "dataset_description.json").is_file():
        raise BIDSSourceError(f"{root}: not a BIDS dataset (no dataset_description.json at its top)")
    try:
        layout = BIDSLayout(str(root), validate=validate)
    except Exception as exc:  # pybids raises its own types for a bad dataset_description.json
        raise BIDSSourceError(f"{root}: pybids cannot read this dataset ({' '.join(str(exc).split())[:300]})") from exc

    if validate:
        validator = BIDSValidator()
        for path in sorted(root.glob("sub-*/**/*")):
            if path.is_file() and not path.name.startswith("."):
                rel = "/" + path.relative_to(root).as_posix()
                if not validator.is_bids(rel):
                    result.problems.append(f"{path}: not a valid BIDS file name (skipped; see the BIDS specification)")
                    result.skipped["not a valid BIDS name"] += 1

    participants = _read_tsv(root / "participants.tsv", "participant_id", result)
    files = layout.get(datatype="anat", extension=[".nii", ".nii.gz"], return_type="object")
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="BIDS images", unit="image")
    sessions_cache: dict[str, dict[str, dict[str, str]]] = {}
    for f in iterator:
        ent = f.get_entities()
        suffix = ent.get("suffix")
        if suffix not in ANAT_SUFFIXES:
            result.skipped[f"anat suffix {suffix!r} is not an MRI contrast"] += 1
            continue
        sub, ses = ent.get("subject"), ent.get("session")
        try:
            meta = layout.get_metadata(f.path)
        except Exception as exc:
            result.problems.append(f"{f.path}: its JSON sidecar cannot be read ({' '.join(str(exc).split())[:200]})")
            meta = {}
        participant = participants.get(f"sub-{sub}", {})
        if ses is not None and sub not in sessions_cache:
            sessions_cache[sub] = _read_tsv(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", "session_id", result)
        session_row = sessions_cache.get(sub, {}).get(f"ses-{ses}", {}) if ses is not None else {}
        split_raw = session_row.get("split") or participant.get("split")
        split = _SPLIT_ALIASES.get((split_raw or "").strip().lower())
        if split_raw and split is None and split_raw.strip().lower() not in ("", "n/a"):
            result.problems.append(f"{f.path}: split {split_raw!r} is not train/val/test (left unset)")
        region = meta.get("BodyPart") or meta.get("BodyPartExamined") or default_region
        row: dict[str, Any] = {
            "image": f.path,
            "id": safe_id(Path(f.filename).name.split(".")[0]),
            "sequence": suffix,
            "study_id": f"sub-{sub}" + (f"_ses-{ses}" if ses is not None else ""),
            "subject": f"sub-{sub}",
            "bids": {k: v for k, v in ent.items() if k in ("subject", "session", "acquisition", "run", "ceagent",
                                                            "reconstruction", "echo", "part", "suffix")},
        }
        if ses is not None:
            row["session"] = f"ses-{ses}"
        if region:
            row["body_region"] = str(region).lower()
        if split:
            row["split"] = split
        acq = {k: meta[k] for k in _SIDECAR_KEYS if k in meta}
        if acq:
            row["acquisition"] = acq
        if participant:
            row["participant"] = {k: v for k, v in participant.items() if k not in ("participant_id", "split")}
        result.rows.append(row)
    result.rows.sort(key=lambda r: (r["study_id"], r["id"]))
    return result


def _read_tsv(path: Path, key: str, result: ScanResult) -> dict[str, dict[str, str]]:
    """Rows of a BIDS TSV by their ``key`` column; a bad file is reported and treated as absent."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or key not in reader.fieldnames:
                result.problems.append(f"{path}: has no '{key}' column (ignored)")
                return {}
            return {row[key].strip(): {k: (v or "").strip() for k, v in row.items() if k} for row in reader if row.get(key)}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        result.problems.append(f"{path}: cannot be read as a UTF-8 TSV ({exc.__class__.__name__}; ignored)")
        return {}
