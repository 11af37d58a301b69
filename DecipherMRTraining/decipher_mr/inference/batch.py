"""Batch inference: one loaded bundle, many volumes (a manifest, a BIDS dataset or a folder).

The session is built once; the volumes stream through with a progress bar. A volume that cannot be
read or run is reported (its file and what is wrong) and the batch goes on. Each finished volume gets
a small record under ``<out>/.decipher-mr/done/`` written after its outputs, so a rerun with the same
bundle and tasks skips it; ``<out>/infer_summary.csv`` lists every volume with its outcome. Every file
is written atomically.

>>> items = discover_inputs("study/manifest.jsonl")
>>> rows = run_batch(session, items, "out", tasks=["segment", "anomaly"])
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from decipher_mr.storage import atomic_write_json, atomic_write_text

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
SUMMARY_CSV = "infer_summary.csv"
STATE_DIR = ".decipher-mr"
SUMMARY_COLUMNS = ("id", "input", "status", "seconds", "outputs", "error")


@dataclass
class BatchItem:
    """One volume of a batch. ``bids`` holds the source's path relative to the dataset root (BIDS input);
    ``error`` is set when the input itself is already known to be bad (a bad manifest line)."""

    id: str
    image: str
    bids: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchInputs:
    kind: str  # manifest | bids | folder
    root: Path
    items: list[BatchItem]


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_folder(folder: Path) -> bool:
    """A folder holding DICOM files directly (checks ``.dcm`` names, else the DICM magic of a few files)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return any(p.suffix.lower() == ".dcm" for p in files) or any(_is_dicom_file(p) for p in files[:3])


def _volume_suffix(name: str) -> str | None:
    low = name.lower()
    return next((s for s in VOLUME_SUFFIXES if low.endswith(s)), None)


def _unique_id(base: str, seen: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-") or "volume"
    out, n = base, 2
    while out in seen:
        out, n = f"{base}-{n}", n + 1
    seen.add(out)
    return out


def input_kind(path: str | os.PathLike) -> str:
    """``volume``, ``manifest``, ``bids`` or ``folder`` for what ``decipher-mr infer`` was given."""
    p = Path(path)
    if not p.exists() or p.is_file():  # a missing path: read_volume says so in its own words
        return "manifest" if p.name.lower().endswith((".jsonl", ".ndjson")) else "volume"
    if (p / "dataset_description.json").is_file():
        return "bids"
    if is_dicom_folder(p) and not any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir()):
        return "volume"  # one DICOM series folder
    return "folder"


def discover_inputs(path: str | os.PathLike, kind: str = "auto") -> BatchInputs:
    """The volumes of a manifest, a BIDS dataset or a folder (NIfTI/NRRD/MHA/MGZ files and DICOM series
    folders, found recursively). Bad manifest lines come back as items with ``error`` set."""
    root = Path(path)
    kind = input_kind(root) if kind == "auto" else kind
    if kind == "manifest":
        return BatchInputs(kind, root, _manifest_items(root))
    if kind == "bids":
        return BatchInputs(kind, root, _bids_items(root))
    if kind == "folder":
        return BatchInputs(kind, root, _folder_items(root))
    raise ValueError(f"{root}: is a single volume, not a batch (manifest, BIDS dataset or folder)")


def _manifest_items(path: Path) -> list[BatchItem]:
    from decipher_mr.data.manifest import read_manifest

    rows, errors = read_manifest(path, strict=False)
    seen: set[str] = set()
    items = [BatchItem(_unique_id(r.id, seen), r.image) for r in rows]
    for err in errors:
        line = getattr(err, "line", None)
        items.append(BatchItem(_unique_id(f"line-{line}", seen), getattr(err, "where", "") or str(path), error=str(err)))
    return items


def _bids_items(root: Path) -> list[BatchItem]:
    """Anatomical images of a BIDS dataset, found (and their names validated) by
    :func:`decipher_mr.data.bids_source.scan_bids` (pybids); files it refuses come back as failed items."""
    from decipher_mr.data.bids_source import scan_bids

    scan = scan_bids(root, validate=True)
    seen: set[str] = set()
    items = []
    base = root.resolve()
    for row in scan.rows:
        path = Path(row["image"])
        rel = path.resolve().relative_to(base).as_posix()
        name = path.name
        items.append(BatchItem(_unique_id(name[: -len(_volume_suffix(name) or "")], seen), str(path), bids=rel))
    for problem in scan.problems:
        where = problem.split(": ", 1)[0]
        if _volume_suffix(where):  # an image the scan refused (e.g. not a valid BIDS name)
            items.append(BatchItem(_unique_id(Path(where).name.split(".")[0], seen), where, error=problem))
    return items


def _folder_items(root: Path) -> list[BatchItem]:
    seen: set[str] = set()
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "derivatives")
        here = Path(folder)
        if here != root and is_dicom_folder(here):
            items.append(BatchItem(_unique_id(here.relative_to(root).as_posix().replace("/", "_"), seen), str(here)))
            continue
        for name in sorted(files):
            suffix = _volume_suffix(name)
            if suffix is None or name.startswith(".") or name.lower().endswith(".seg.nrrd"):
                continue
            rel = (here / name).relative_to(root).as_posix()[: -len(suffix)]
            items.append(BatchItem(_unique_id(rel.replace("/", "_"), seen), str(here / name)))
    return items


# --- running ------------------------------------------------------------------------------------
def run_tasks(session, volume, tasks: Sequence[str], queries: Sequence[str] = (),
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What ``infer`` computes for one volume: ``{"segmentation": ..., "anomaly": ..., "ground-<q>": ...}``."""
    from .outputs import safe_name

    results: dict[str, Any] = {}
    calls = {"segment": ("segmentation", session.segment), "anomaly": ("anomaly", session.anomaly_map),
             "localize": ("localization", session.localize), "classify": ("classification", session.classify)}
    for task in tasks:
        t = time.perf_counter()
        name, fn = calls[task]
        results[name] = fn(volume)
        if say:
            say(f"{task}: {time.perf_counter() - t:.2f} s")
    for q in queries:
        t = time.perf_counter()
        results[f"ground-{safe_name(q)}"] = session.ground(volume, q)
        if say:
            say(f"query {q!r}: {time.perf_counter() - t:.2f} s")
    return results


def _settings(session, tasks, queries, fmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"fingerprint": session.fingerprint, "heads": sorted(session.bundle.head_specs), "tasks": list(tasks),
            "queries": list(queries), "format": fmt, **extra}


def _done_path(out: Path, item_id: str) -> Path:
    return out / STATE_DIR / "done" / f"{item_id}.json"


def already_done(out: Path, item: BatchItem, settings: dict[str, Any]) -> bool:
    """True when ``item`` was finished by an earlier run with the same settings and its files are still there."""
    path = _done_path(out, item.id)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (rec.get("settings") == settings and rec.get("input") == item.image
            and all((out / f).is_file() for f in rec.get("outputs", [])))


def _summary_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _error_text(item: BatchItem, exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    where = item.image
    return msg if where and where in msg else f"{where}: {msg}"


def run_batch(session, inputs: BatchInputs, out: str | os.PathLike, tasks: Sequence[str], queries: Sequence[str] = (),
              fmt: str = "nii.gz", previews: bool = False, dicom_seg: bool = False, progress: bool = True,
              provenance: dict[str, Any] | None = None, say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run ``tasks`` (and ``queries``) on every item; return the summary rows (also in ``infer_summary.csv``).

    Plain inputs write ``<out>/<id>/`` as single-volume ``infer`` does (``summary.json``, volumes,
    previews, ``<name>.dcm`` DICOM-SEG with ``dicom_seg``). BIDS inputs write BIDS derivatives into
    ``out`` (:mod:`.derivatives`). A row's ``status`` is ``ok``, ``skipped`` (done by an earlier run) or
    ``failed`` (``error`` says which file and what is wrong).
    """
    from tqdm import tqdm

    from .runtime import as_volume

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = dict(provenance or {})
    settings = _settings(session, tasks, queries, fmt,
                         {"layout": inputs.kind, "dicom_seg": bool(dicom_seg), "previews": bool(previews)})
    if inputs.kind == "bids":
        from .derivatives import write_dataset_description

        write_dataset_description(out, inputs.root, provenance)
    bar = tqdm(inputs.items, desc="infer", unit="volume", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def note(msg: str) -> None:
        if say is not None:
            say(msg)
        elif progress:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for item in bar:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"id": item.id, "input": item.image, "status": "", "seconds": "", "outputs": "", "error": ""}
        if item.error:
            row.update(status="failed", error=item.error)
        elif already_done(out, item, settings):
            rec = json.loads(_done_path(out, item.id).read_text(encoding="utf-8"))
            row.update(status="skipped", outputs=";".join(rec.get("outputs", [])))
        else:
            try:
                volume = as_volume(item.image)
                results = run_tasks(session, volume, tasks, queries)
                files = _write_item(session, inputs, item, volume, results, out, fmt, previews, dicom_seg, provenance)
                rel = [Path(f).resolve().relative_to(out.resolve()).as_posix() for f in files]
                atomic_write_json(_done_path(out, item.id), {"input": item.image, "settings": settings, "outputs": rel})
                row.update(status="ok", outputs=";".join(rel))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the batch
                row.update(status="failed", error=_error_text(item, exc))
        if row["status"] == "failed":
            note(f"failed {item.id}: {row['error']}")
        counts[row["status"]] += 1
        row["seconds"] = f"{time.perf_counter() - t0:.3f}"
        rows.append(row)
        bar.set_postfix(counts, refresh=False)
        atomic_write_text(out / SUMMARY_CSV, _summary_csv(rows))
    bar.close()
    if not rows:
        atomic_write_text(out / SUMMARY_CSV, _summary_csv(rows))
    return rows


def _write_item(session, inputs: BatchInputs, item: BatchItem, volume, results: dict[str, Any], out: Path, fmt: str,
                previews: bool, dicom_seg: bool, provenance: dict[str, Any]) -> list[Path]:
    if inputs.kind == "bids":
        from .derivatives import write_bids_outputs

        return write_bids_outputs(out, item.bids or Path(item.image).name, volume, results, session, provenance)
    from .outputs import write_results

    dest = out / item.id
    extra = {"bundle": provenance.get("bundle", str(session.bundle.source)), "fingerprint": session.fingerprint}
    summary = write_results(dest, volume, results, fmt=fmt, previews=previews, extra=extra)
    files = [dest / "summary.json"]
    for entry in summary["outputs"].values():
        files += [Path(entry[k]) for k in ("file", "mask_file", "preview") if isinstance(entry, dict) and entry.get(k)]
    if dicom_seg:
        from .dicom_seg import write_dicom_segs

        files += write_dicom_segs(session, volume, results, dest, source=item.image)
    return files
