"""Radiology reports joined onto manifest rows: from a CSV/TSV/JSONL table on a key the user names,
or from text files beside the studies.

Join keys (``join_on``): ``AccessionNumber``, ``StudyInstanceUID``, ``PatientID`` (DICOM trees),
``subject`` or ``subject,session`` (BIDS), or ``study_id``. The table's key column(s) default to the same
names; ``participant_id``/``session_id`` are accepted for BIDS, with or without the ``sub-``/``ses-``
prefix; an empty session matches a subject without sessions. Report text is patient data: it goes into the manifest (``report_text``) and never into a
message, a log or the dry-run table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .scan_result import ScanResult

ROW_FIELDS = {"accessionnumber": "accession_number", "accession": "accession_number",
              "studyinstanceuid": "study_uid", "study_uid": "study_uid", "patientid": "patient_id",
              "subject": "subject", "participant_id": "subject", "session": "session", "session_id": "session",
              "study_id": "study_id"}
TEXT_COLUMNS = ("report_text", "report", "text", "findings", "impression", "report_body")
_ALIASES = {"subject": ("subject", "participant_id", "sub"), "session": ("session", "session_id", "ses")}
BESIDE_NAMES = ("report.txt", "REPORT.txt", "report.TXT")


class ReportTableError(ValueError):
    """The report table cannot be used at all (missing, unreadable, no key column)."""


def load_report_table(path: str | Path, join_on: list[str], key_columns: list[str] | None = None,
                      text_column: str | None = None, problems: list[str] | None = None) -> dict[tuple, str]:
    """``{key tuple: report text}`` from a CSV, TSV or JSONL file. Bad lines go to ``problems``
    (``<file>:<line>: ...``) and the rest is kept."""
    path = Path(path)
    problems = problems if problems is not None else []
    records = _records(path, problems)
    if not records:
        raise ReportTableError(f"{path}: no report rows found")
    columns = list(records[0][1].keys())
    keys = key_columns or [_find_column(columns, name, path) for name in join_on]
    if len(keys) != len(join_on):
        raise ReportTableError(f"{path}: give one key column per join field ({', '.join(join_on)})")
    for k in keys:
        if k not in columns:
            raise ReportTableError(f"{path}: no column {k!r} (columns: {', '.join(columns)})")
    text_col = text_column or next((c for c in columns if c.lower() in TEXT_COLUMNS), None)
    if text_col is None or text_col not in columns:
        raise ReportTableError(f"{path}: no report text column (name it with --report-text-column; "
                               f"looked for {', '.join(TEXT_COLUMNS)}; columns: {', '.join(columns)})")
    table: dict[tuple, str] = {}
    for line, rec in records:
        key = tuple(_norm(field, rec.get(col)) for field, col in zip(join_on, keys))
        text = rec.get(text_col)
        if any(not k for k, f in zip(key, join_on) if f.lower() not in ("session", "session_id")):
            problems.append(f"{path}:{line}: empty key ({', '.join(keys)}); row skipped")
        elif not isinstance(text, str) or not text.strip():
            problems.append(f"{path}:{line}: empty or non-text report in column {text_col!r}; row skipped")
        elif key in table:
            problems.append(f"{path}:{line}: key {'/'.join(key)} appears twice; the first report is kept")
        else:
            table[key] = text
    return table


def join_reports(result: ScanResult, table: dict[tuple, str], join_on: list[str]) -> tuple[int, int]:
    """Set ``report_text`` on the rows whose key is in the table; returns (matched, unused table rows)."""
    used = set()
    fields = [ROW_FIELDS.get(j.lower(), j) for j in join_on]
    for row in result.rows:
        key = tuple(_norm(j, row.get(f)) for j, f in zip(join_on, fields))
        if key in table:
            row["report_text"] = table[key]
            row.pop("report", None)
            used.add(key)
    unused = len(set(table) - used)
    if unused:
        result.notes.append(f"{unused} report(s) in the table matched no series")
    return len(used), unused


def reports_beside(result: ScanResult) -> int:
    """``report`` = the nearest ``report.txt`` (or ``<study_id>.txt``) in the series' folder or a parent
    folder up to the scanned root. Returns how many rows got one."""
    root = Path(result.root)
    n = 0
    for row in result.rows:
        image = Path(row.get("source_folder") or row["image"])  # a converted series: its DICOM folder
        folder = image if image.is_dir() else image.parent
        while True:
            names = BESIDE_NAMES + (f"{row.get('study_id')}.txt", f"{row.get('study_id')}_report.txt")
            hit = next((folder / name for name in names if (folder / name).is_file()), None)
            if hit is not None:
                row["report"] = str(hit)
                n += 1
                break
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return n


def _records(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise ReportTableError(f"{path}: report table does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ReportTableError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    out: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); row skipped")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{n}: expected a JSON object; row skipped")
                continue
            out.append((n, obj))
        return out
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        for rec in reader:
            if None in rec:  # more cells than header columns
                problems.append(f"{path}:{reader.line_num}: more cells than columns (quote the text); row skipped")
                continue
            out.append((reader.line_num, rec))
    except csv.Error as exc:
        problems.append(f"{path}:{reader.line_num}: {exc}; the rest of the file is skipped")
    return out


def _find_column(columns: list[str], name: str, path: Path) -> str:
    wanted = {name.lower(), *(a.lower() for a in _ALIASES.get(name.lower(), ()))}
    for c in columns:
        if c.lower() in wanted:
            return c
    raise ReportTableError(f"{path}: no key column for {name!r} (columns: {', '.join(columns)}; "
                           "name it with --report-key-column)")


def _norm(field: str, value: Any) -> str:
    text = "" if value is None else str(value).strip()
    f = field.lower()
    if text and f in ("subject", "participant_id") and not text.startswith("sub-"):
        text = "sub-" + text
    if text and f in ("session", "session_id") and not text.startswith("ses-"):
        text = "ses-" + text
    return text
