"""Write the JSONL manifest from a BIDS dataset or a DICOM tree, with reports joined on a key.

The source kind is detected (a dataset_description.json at the top = BIDS, else a DICOM tree). A BIDS
dataset is read and its file names validated with pybids; a DICOM tree is grouped into series with
pydicom (non-image objects, localisers and too-thin series are skipped with a reason; sequence and body
region are proposed from the tags and listed for review). A bad file is reported, naming the file and
what is wrong, and the rest goes on. The manifest is written atomically, paths relative to its folder.

examples:
  # a BIDS dataset; look first, then write (split from participants.tsv's 'split' column if it has one)
  decipher-mr manifest /data/ds001 --dry-run
  decipher-mr manifest /data/ds001 --out /data/ds001/manifest.jsonl

  # BIDS with reports in a spreadsheet keyed by subject and session
  decipher-mr manifest /data/ds001 --reports reports.tsv --join-on subject,session --out ds001.jsonl

  # a PACS export: reports joined on AccessionNumber, series listed for review before writing
  decipher-mr manifest /pacs/export --reports reports.csv --join-on AccessionNumber --dry-run --show-series
  decipher-mr manifest /pacs/export --reports reports.csv --join-on AccessionNumber --out pacs.jsonl

  # every series converted to NIfTI with dcm2niix; report.txt files beside the studies
  decipher-mr manifest /pacs/export --convert /pacs/nifti --reports-beside --out pacs.jsonl

exit status: 0 written (or dry run), 1 nothing usable found or the source cannot be read,
2 written but some files had problems (with --strict only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a BIDS dataset folder or a folder holding a DICOM tree (any layout)")
    p.add_argument("--out", help="manifest to write (JSON Lines); required unless --dry-run")
    p.add_argument("--dry-run", action="store_true", help="print what was found and write nothing")
    p.add_argument("--kind", choices=("auto", "bids", "dicom"), default="auto", help="source kind (default: auto)")
    p.add_argument("--body-region", help="body region for series that have no tag saying so (e.g. brain)")
    g = p.add_argument_group("reports")
    g.add_argument("--reports", help="CSV, TSV or JSONL table of reports")
    g.add_argument("--join-on", default=None, help="key(s) joining the table to series: AccessionNumber, "
                   "StudyInstanceUID, PatientID, subject, subject,session or study_id")
    g.add_argument("--report-key-column", help="the table's key column(s), comma-separated (default: as --join-on)")
    g.add_argument("--report-text-column", help="the table's report text column (default: report/text/findings...)")
    g.add_argument("--reports-beside", action="store_true",
                   help="use report.txt (or <study_id>.txt) files in a series' folder or its parents")
    g = p.add_argument_group("DICOM trees")
    g.add_argument("--min-slices", type=int, default=10, help="thinner series are skipped (default 10)")
    g.add_argument("--convert", metavar="DIR", help="convert every series to NIfTI in DIR with dcm2niix")
    g.add_argument("--show-series", action="store_true", help="list each series with its proposed sequence/region")
    g = p.add_argument_group("BIDS")
    g.add_argument("--no-validate", action="store_true", help="do not check BIDS file names (pybids validate=False)")
    p.add_argument("--strict", action="store_true", help="exit 2 when any file had a problem")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.manifest import read_manifest, write_manifest

    if not args.dry_run and not args.out:
        print("error: give --out MANIFEST.jsonl (or --dry-run to look first)", file=sys.stderr)
        return 1
    source = Path(args.source)
    if not source.is_dir():
        print(f"error: {source}: not a folder (give a BIDS dataset or a DICOM tree)", file=sys.stderr)
        return 1
    try:
        result = scan(source, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_table(result, show_series=args.show_series))
    for msg in result.problems:
        print(f"problem: {msg}", file=sys.stderr)
    if not result.rows:
        print(f"error: {source}: no usable MRI series found", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    out = Path(args.out).resolve()
    rows = [_relative(row, out.parent) for row in result.rows]
    write_manifest(rows, out)
    read_manifest(out)  # the manifest's own validation: raises if a row is not acceptable
    print(f"wrote {len(rows)} series to {out}")
    return 2 if args.strict and result.problems else 0


def scan(source: Path, args: argparse.Namespace):
    """Scan ``source`` and join reports as the arguments say (shared by the CLI and the tests)."""
    from ..data.report_join import join_reports, load_report_table, reports_beside

    kind = args.kind
    if kind == "auto":
        kind = "bids" if (source / "dataset_description.json").is_file() else "dicom"
    progress = not args.no_progress and sys.stderr.isatty()
    if kind == "bids":
        from ..data.bids_source import scan_bids

        result = scan_bids(source, default_region=args.body_region, validate=not args.no_validate, progress=progress)
    else:
        from ..data.dicom_tree import scan_dicom

        result = scan_dicom(source, min_slices=args.min_slices, default_region=args.body_region,
                            convert_to=args.convert, progress=progress)
    if args.reports_beside:
        reports_beside(result)
    if args.reports:
        if not args.join_on:
            raise ValueError("--reports needs --join-on (e.g. AccessionNumber, or subject,session)")
        join_on = [j.strip() for j in args.join_on.split(",") if j.strip()]
        keys = [k.strip() for k in args.report_key_column.split(",")] if args.report_key_column else None
        table = load_report_table(args.reports, join_on, keys, args.report_text_column, result.problems)
        join_reports(result, table, join_on)
    return result


def render_table(result, show_series: bool = False) -> str:
    """The dry-run table: counts of studies, series, sequences, regions, reports, skips and problems
    (no report text, no patient names)."""
    s = result.summary()
    lines = [f"{result.kind.upper()} source: {result.root}", ""]
    width = 34

    def add(name, value):
        lines.append(f"  {name:<{width}} {value}")

    add("studies", s["studies"])
    add("series", s["series"])
    add("sequences", _counts(s["sequences"]))
    add("body regions", _counts(s["regions"]))
    add("reports matched", s["reports matched"])
    add("reports unmatched", s["reports unmatched"])
    for reason, n in sorted(result.skipped.items()):
        add(f"skipped: {reason}", n)
    add("problems", len(result.problems))
    if show_series or (result.kind == "dicom" and len(result.rows) <= 40):
        lines += ["", "  series (proposals to review):"] + [f"    {note}" for note in result.notes]
    return "\n".join(lines)


def _counts(counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "-"


def _relative(row: dict, base: Path) -> dict:
    row = dict(row)
    for key in ("image", "report", "mask", "source_folder"):
        if row.get(key):
            row[key] = os.path.relpath(row[key], base)
    json.dumps(row)  # every value must be JSON (pybids entity values are plain types)
    return row
