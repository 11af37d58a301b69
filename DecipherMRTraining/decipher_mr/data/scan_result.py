"""What a scan of a BIDS dataset or a DICOM tree found: manifest rows, skipped items and problems.

Rows are plain dicts in the manifest's format (:mod:`decipher_mr.data.manifest`) with absolute paths;
``problems`` are messages that each name the file and what is wrong (never report text).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ScanResult:
    kind: str  # "bids" or "dicom"
    root: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    notes: list[str] = field(default_factory=list)  # per-series review lines (proposals, skips)

    def summary(self) -> dict[str, Any]:
        """Counts for the dry-run table."""
        return {
            "studies": len({r.get("study_id") for r in self.rows}),
            "series": len(self.rows),
            "sequences": Counter(r.get("sequence") or "unknown" for r in self.rows),
            "regions": Counter(r.get("body_region") or "unknown" for r in self.rows),
            "reports matched": sum(1 for r in self.rows if r.get("report") or r.get("report_text") is not None),
            "reports unmatched": sum(1 for r in self.rows if not (r.get("report") or r.get("report_text") is not None)),
        }


def safe_id(text: str) -> str:
    """A manifest id (letters, digits, '.', '_', '-') from any text."""
    return _UNSAFE.sub("_", text).strip("._-") or "series"


def unique_ids(rows: list[dict[str, Any]]) -> None:
    """Make ``id`` unique in place by appending ``-2``, ``-3``... to repeats."""
    seen: Counter = Counter()
    for row in rows:
        base = row["id"]
        seen[base] += 1
        if seen[base] > 1:
            row["id"] = f"{base}-{seen[base]}"
