"""Preparing a manifest once into the cache that training reads (see :mod:`decipher_mr.data.cache`).

Each series is read, preprocessed (:mod:`decipher_mr.data.preprocess`) and written as
``items/<id>.npy``; its ``mask`` and ``regions`` label maps are moved onto the same prepared grid with
nearest-neighbour and written as ``items/<id>.mask.npy`` / ``items/<id>.regions.npy``. The index row
holds the manifest's metadata, the report text, the :class:`GeometryRecord` (``geometry``) and a
fingerprint of the source files (path, size, modification time).

The run is resumable: an item whose fingerprint matches its index row is skipped; the index and every
array are written atomically after each finished item, so killing the run never leaves a damaged
cache. A failing item is recorded with its reason and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import atomic_save_npy, atomic_write_json, atomic_write_text
from .cache import CACHE_FORMAT, CacheItem
from .io import DEFAULT_MAX_VOXELS, read_report, read_volume
from .manifest import ManifestRow, read_manifest
from .preprocess import CANONICAL_ORIENTATION, PreprocessConfig, preprocess_volume, resample_to_prepared

# Index fields that come from the manifest and may change without the arrays changing.
_METADATA_FIELDS = ("body_region", "sequence", "split", "study_id", "labels")
_RESERVED = set(CacheItem.__dataclass_fields__) | {"geometry", "fingerprint", "regions", "report_text"}


class PrepareError(RuntimeError):
    """The cache cannot be prepared at all (unreadable manifest, different settings, damaged index)."""


@dataclass
class PrepareFailure:
    id: str
    source: str
    reason: str
    line: int | None = None


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did. ``ok`` is False when any item failed."""

    out: str
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[PrepareFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        lines = [f"{self.out}: {len(self.prepared)} prepared, {len(self.skipped)} already up to date, {len(self.failed)} failed"]
        lines += [f"  failed {f.id}: {f.reason}" for f in self.failed]
        return "\n".join(lines)


def prepare_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: PreprocessConfig | None = None,
    workers: int = 1,
    allow_failures: bool = False,
    progress: bool = True,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> PrepareSummary:
    """Prepare every series of ``manifest`` into the cache folder ``out`` (resumable).

    ``allow_failures`` only changes the command line's exit code; failures are always listed in the
    summary and in ``out/failures.json``.

    >>> summary = prepare_manifest("data/manifest.jsonl", "cache", PreprocessConfig(target_spacing=(2, 2, 2)))
    >>> print(summary.describe())
    """
    from tqdm import tqdm

    config = config or PreprocessConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim_cache(out, config)
    _remove_stale_temporaries(out)
    index = _load_index(out)
    try:
        rows, errors = read_manifest(manifest, strict=False)
    except ValueError as exc:
        raise PrepareError(str(exc)) from exc

    summary = PrepareSummary(out=str(out))
    summary.failed += [PrepareFailure(f"line {e.line}", str(manifest), str(e), e.line) for e in errors]
    order = [r.id for r in rows]
    todo: list[dict[str, Any]] = []
    refreshed = False
    for row in rows:
        uid = row.extra.get("series_uid", series_uid)
        fingerprint = source_fingerprint(row, uid)
        old = index.get(row.id)
        if old is not None and old.get("fingerprint") == fingerprint and _arrays_present(out, old):
            summary.skipped.append(row.id)
            updated = _with_metadata(old, row)
            refreshed |= updated != old
            index[row.id] = updated
            continue
        todo.append(
            {
                "row": asdict(row),
                "out": str(out),
                "config": config.to_json(),
                "series_uid": uid,
                "max_voxels": int(max_voxels),
                "fingerprint": fingerprint,
            }
        )
    if refreshed:
        _write_index(out, index, order)

    bar = tqdm(total=len(todo), desc="prepare", unit="series", file=sys.stderr, disable=not progress)

    def finish(task: dict[str, Any], result: dict[str, Any]) -> None:
        row = task["row"]
        if result["ok"]:
            index[row["id"]] = result["index"]
            _write_index(out, index, order)
            summary.prepared.append(row["id"])
        else:
            summary.failed.append(PrepareFailure(row["id"], row["image"], result["reason"], row["line"]))
            if progress:
                bar.write(f"failed {row['id']}: {result['reason']}", file=sys.stderr)
        bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                finish(task, prepare_item(task))
        else:
            _run_pool(todo, workers, finish)
    finally:
        bar.close()
        atomic_write_json(out / "failures.json", [asdict(f) for f in summary.failed])
    return summary


def prepare_item(task: dict[str, Any]) -> dict[str, Any]:
    """Prepare one series (runs in a worker process). Returns ``{"ok": True, "index": row}`` or
    ``{"ok": False, "reason": "<file>: <problem>"}``; it never raises for a bad input.

    >>> prepare_item({"row": asdict(row), "out": "cache", "config": cfg.to_json(), "series_uid": None,
    ...               "max_voxels": 512**3, "fingerprint": source_fingerprint(row)})
    """
    row = ManifestRow(**task["row"])
    try:
        return {"ok": True, "index": _prepare_row(row, task)}
    except (ValueError, OSError) as exc:
        # Our readers put the file name first; OS errors name it themselves.
        return {"ok": False, "reason": str(exc)}
    except Exception as exc:  # an unexpected bug must not stop the other items
        return {"ok": False, "reason": f"{row.image}: {type(exc).__name__}: {exc}"}


def source_fingerprint(row: ManifestRow, series_uid: str | None = None) -> str:
    """A digest of the source files (path, size, modification time) and inline report of a row.

    >>> source_fingerprint(read_manifest("m.jsonl")[0])
    'sha256:3f1c...'
    """
    h = hashlib.sha256()
    for name in ("image", "report", "mask", "regions"):
        value = getattr(row, name)
        h.update(f"{name}={value}\n".encode())
        if value is not None:
            for line in _file_stamps(Path(value)):
                h.update(line.encode())
    if row.report_text is not None:
        h.update(b"report_text=" + hashlib.sha256(row.report_text.encode("utf-8")).digest())
    h.update(f"series_uid={series_uid}\n".encode())
    return "sha256:" + h.hexdigest()


# --- internals ------------------------------------------------------------------------------
def _prepare_row(row: ManifestRow, task: dict[str, Any]) -> dict[str, Any]:
    out = Path(task["out"])
    config = PreprocessConfig.from_json(task["config"])
    max_voxels = task["max_voxels"]
    # Read and check every input before writing anything, so a bad mask leaves no half-written item.
    volume = read_volume(row.image, series_uid=task["series_uid"], max_voxels=max_voxels)
    report = read_report(row.report) if row.report else row.report_text
    labelmaps = {
        key: read_volume(path, max_voxels=max_voxels, allow_constant=True)
        for key, path in (("mask", row.mask), ("regions", row.regions))
        if path
    }
    for key, vol in labelmaps.items():
        if np.issubdtype(vol.array.dtype, np.floating) and not np.array_equal(vol.array, np.round(vol.array)):
            raise ValueError(f"{vol.path}: {key} is not a label map (it has non-integer values)")

    array, record = preprocess_volume(volume, config)
    files = {"array": f"items/{row.id}.npy"}
    atomic_save_npy(out / files["array"], array)
    for key, vol in labelmaps.items():
        labels = resample_to_prepared(vol, record, interpolation="nearest")
        files[key] = f"items/{row.id}.{key}.npy"
        atomic_save_npy(out / files[key], labels.astype(_label_dtype(labels), copy=False))

    extra = {k if k not in _RESERVED else f"manifest_{k}": v for k, v in row.extra.items()}
    extra.update(geometry=record.to_json(), fingerprint=task["fingerprint"])
    if "regions" in files:
        extra["regions"] = files["regions"]
    item = CacheItem(
        id=row.id,
        array=files["array"],
        shape=record.prepared_shape,
        spacing=tuple(record.grid_spacing),
        body_region=row.body_region,
        sequence=row.sequence,
        split=row.split,
        study_id=row.study_id,
        report=report,
        labels=row.labels,
        mask=files.get("mask"),
        source=row.image,
        extra=extra,
    )
    return item.to_json()


def _label_dtype(labels: np.ndarray) -> np.dtype:
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _run_pool(todo: list[dict[str, Any]], workers: int, finish) -> None:
    # "spawn" so that workers start clean (no forked torch / thread state) on every platform.
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(prepare_item, task): task for task in todo}
        try:
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    result = fut.result()
                except BrokenProcessPool as exc:
                    result = {"ok": False, "reason": f"{task['row']['image']}: worker process died ({exc})"}
                finish(task, result)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _remove_stale_temporaries(out: Path) -> None:
    # A killed run can leave the hidden temporary files of atomic writes (".<name>.<random>.npy").
    items = out / "items"
    if items.is_dir():
        for tmp in items.glob(".*.npy"):
            tmp.unlink(missing_ok=True)


def _init_worker(threads: int) -> None:
    # ITK threads over all cores in every process; N workers each doing that would oversubscribe.
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _file_stamps(path: Path) -> list[str]:
    try:
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file())
        else:
            entries = [path]
        return [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in entries]
    except OSError:
        return ["missing\n"]


def _arrays_present(out: Path, obj: dict[str, Any]) -> bool:
    paths = [obj.get("array"), obj.get("mask"), obj.get("regions")]
    return all((out / p).is_file() for p in paths if p)


def _with_metadata(old: dict[str, Any], row: ManifestRow) -> dict[str, Any]:
    new = dict(old)
    for name in _METADATA_FIELDS:
        new[name] = getattr(row, name)
    for k, v in row.extra.items():
        new[k if k not in _RESERVED else f"manifest_{k}"] = v
    return new


def _claim_cache(out: Path, config: PreprocessConfig) -> None:
    meta_path = out / "cache.json"
    wanted = config.to_json()
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            have = PreprocessConfig.from_json(meta["preprocess"]).to_json()
        except (ValueError, KeyError, TypeError) as exc:
            raise PrepareError(f"{meta_path}: unreadable cache description ({exc}); prepare into a new --out folder") from exc
        if have != wanted:
            diff = ", ".join(f"{k}: cache has {have.get(k)!r}, asked {wanted[k]!r}" for k in wanted if have.get(k) != wanted[k])
            raise PrepareError(
                f"{out} was prepared with different settings ({diff}); refusing to mix them. "
                "Use a new --out folder, or the cache's settings."
            )
        return
    from decipher_mr import __version__

    atomic_write_json(
        meta_path,
        {"format": CACHE_FORMAT, "orientation": CANONICAL_ORIENTATION, "preprocess": wanted, "written_by": f"decipher-mr {__version__}"},
    )


def _load_index(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "index.jsonl"
    index: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return index
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
                index[obj["id"]] = obj
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PrepareError(f"{path}:{n}: damaged index line ({exc}); prepare into a new --out folder") from exc
    return index


def _write_index(out: Path, index: dict[str, dict[str, Any]], order: list[str]) -> None:
    # Manifest order first, so a resumed run and a straight-through run write identical indexes.
    listed = set(order)
    ids = [i for i in order if i in index] + [i for i in index if i not in listed]
    atomic_write_text(out / "index.jsonl", "".join(json.dumps(index[i], ensure_ascii=False) + "\n" for i in ids))
