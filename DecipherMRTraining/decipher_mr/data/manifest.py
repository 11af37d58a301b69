"""The manifest: a JSON Lines file, one MRI series per line.

Fields of a line (only ``image`` is required)::

    {"image": "sub-01/anat/T1w.nii.gz",   # NIfTI/NRRD/MHA file or DICOM series folder
     "report": "sub-01/report.txt",       # UTF-8 text file ... or "report_text": "..." inline
     "body_region": "brain", "sequence": "T1w",
     "labels": {"lesion": 1},             # any JSON object
     "mask": "sub-01/lesion.nii.gz",      # lesion / structure label map on the same patient
     "regions": "sub-01/aal.nii.gz",      # anatomical label map (e.g. AAL)
     "split": "train",                    # train / val / test
     "study_id": "S001",
     "id": "sub-01_T1w"}                  # default: derived from the image path

Relative paths resolve against the manifest's folder. Unknown keys are kept (``ManifestRow.extra``).
Each bad line gives a :class:`ManifestError` naming ``<file>:<line>`` and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..storage import atomic_write_text

SPLITS = ("train", "val", "test")
PATH_FIELDS = ("image", "report", "mask", "regions")
TEXT_FIELDS = ("report_text", "body_region", "sequence", "split", "study_id", "id")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


class ManifestError(ValueError):
    """A manifest line is invalid. ``where`` is ``<file>:<line>``; ``field`` the offending key."""

    def __init__(self, message: str, where: str = "", field: str | None = None, line: int | None = None):
        super().__init__(message)
        self.where, self.field, self.line = where, field, line


@dataclass
class ManifestRow:
    """One series of a manifest, with paths already resolved.

    >>> row = read_manifest("data/manifest.jsonl")[0]; row.image
    '/abs/data/sub-01/anat/T1w.nii.gz'
    """

    image: str
    id: str
    report: str | None = None
    report_text: str | None = None  # patient data: never logged
    body_region: str | None = None
    sequence: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    mask: str | None = None
    regions: str | None = None
    split: str | None = None
    study_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    manifest: str = ""

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def derive_id(image: str, base: Path) -> str:
    """A file-name-safe id from the image path, relative to the manifest folder when possible.

    >>> derive_id("/data/sub-01/anat/T1w.nii.gz", Path("/data"))
    'sub-01_anat_T1w'
    """
    p = Path(image)
    try:
        rel = p.relative_to(base)
    except ValueError:
        rel = Path(p.name)
    text = str(rel).replace(os.sep, "/")
    low = text.lower()
    for suffix in _VOLUME_SUFFIXES:
        if low.endswith(suffix):
            text = text[: -len(suffix)]
            break
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "_")).strip("._-")
    return text or "series"


def read_manifest(path: str | os.PathLike, strict: bool = True):
    """Read and validate a manifest.

    ``strict=True`` returns ``list[ManifestRow]`` and raises one :class:`ManifestError` listing every
    bad line; ``strict=False`` returns ``(rows, errors)`` with the good rows and one error per bad line.

    >>> rows = read_manifest("data/manifest.jsonl")
    >>> rows, errors = read_manifest("data/manifest.jsonl", strict=False)
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest does not exist", str(path)) from exc
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not valid UTF-8", str(path)) from None
    base = path.resolve().parent
    rows: list[ManifestRow] = []
    errors: list[ManifestError] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _parse_line(line, n, path, base)
        except ManifestError as exc:
            errors.append(exc)
            continue
        if row.id in seen:
            errors.append(
                ManifestError(
                    f"{path}:{n}: line {n}, field 'id': duplicate id {row.id!r} (also on line {seen[row.id]})",
                    f"{path}:{n}",
                    "id",
                    n,
                )
            )
            continue
        seen[row.id] = n
        rows.append(row)
    if strict:
        if errors:
            exc = ManifestError("\n".join(str(e) for e in errors), errors[0].where, errors[0].field, errors[0].line)
            exc.errors = errors  # type: ignore[attr-defined]
            raise exc
        return rows
    return rows, errors


def write_manifest(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write manifest rows (plain dicts) as JSON Lines, atomically.

    >>> write_manifest([{"image": "a.nii.gz", "split": "train"}], "data/manifest.jsonl")
    """
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _parse_line(line: str, n: int, path: Path, base: Path) -> ManifestRow:
    where = f"{path}:{n}"

    def fail(msg: str, fld: str | None = None) -> ManifestError:
        head = f"line {n}, field '{fld}'" if fld else f"line {n}"
        return ManifestError(f"{where}: {head}: {msg}", where, fld, n)

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {_kind(obj)}")
    if "image" not in obj:
        raise fail("missing (every line needs the image path)", "image")
    for key in PATH_FIELDS + TEXT_FIELDS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_kind(value)}", key)
        if key != "report_text" and not value.strip():
            raise fail("is empty", key)
    if "labels" in obj and obj["labels"] is not None and not isinstance(obj["labels"], dict):
        raise fail(f"expected an object, got {_kind(obj['labels'])}", "labels")
    if obj.get("report") is not None and obj.get("report_text") is not None:
        raise fail("give either 'report' (a file) or 'report_text' (inline), not both", "report")
    if obj.get("split") is not None and obj["split"] not in SPLITS:
        raise fail(f"expected one of {', '.join(SPLITS)}, got {obj['split']!r}", "split")

    resolved = {k: _resolve(obj[k], base) for k in PATH_FIELDS if obj.get(k) is not None}
    row_id = obj.get("id")
    if row_id is not None and not _SAFE_ID.match(row_id):
        raise fail(f"{row_id!r} must be a plain file name (letters, digits, '.', '_', '-')", "id")
    known = set(PATH_FIELDS + TEXT_FIELDS) | {"labels"}
    return ManifestRow(
        image=resolved["image"],
        id=row_id or derive_id(resolved["image"], base),
        report=resolved.get("report"),
        report_text=obj.get("report_text"),
        body_region=obj.get("body_region"),
        sequence=obj.get("sequence"),
        labels=dict(obj.get("labels") or {}),
        mask=resolved.get("mask"),
        regions=resolved.get("regions"),
        split=obj.get("split"),
        study_id=obj.get("study_id"),
        extra={k: v for k, v in obj.items() if k not in known},
        line=n,
        manifest=str(path),
    )


def _resolve(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )
