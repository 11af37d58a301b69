"""The retrieval index on disk: embeddings plus metadata in append-only segments, and a derived
approximate index.

Layout of an index folder::

    index.json                   format, the bundle fingerprint it was built with, dim, spaces
    segments/000000.json         the segment's records (id, study_id, report, body_region, image, ...)
    segments/000000.image.npy    (n, dim) float32 unit-norm image embeddings
    segments/000000.report.npy   (n, dim) report embeddings (zero rows where a study has no report)
    ann/image.faiss, image.json  approximate index of a space, and how many rows it covers

A segment is committed by its ``.json``, written last and atomically: arrays without one are
leftovers of an interrupted build and are ignored (and overwritten by the next append). So a build
can be killed at any moment and resumed, and appending never rewrites what is there. The
approximate index is derived data: when rows were appended since it was built, the new rows are
added to it (no retraining) the next time it is used; it is retrained only once the index has grown
well past the size it was trained on.

Report text is patient data: it is stored here because report retrieval returns it, and nothing in
this module prints or logs it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from decipher_mr.storage import atomic_save_npy, atomic_write_json

from .ann import DEFAULT_NPROBE, MIN_IVF_ROWS, AnnIndex, exact_search

INDEX_FORMAT = 1
SPACES = ("image", "report")
# retrain the approximate index once the data outgrew its k-means cells this many times over
RETRAIN_GROWTH = 4


class IndexStoreError(ValueError):
    """An index folder that cannot be used; the message names the folder and the reason."""



class IndexMismatchError(IndexStoreError):
    """The index was built with another model bundle (its embeddings live in another space)."""


class VectorIndex:
    """Embeddings and metadata of indexed studies; exact and approximate search.

    >>> idx = VectorIndex.open("demo/index")
    >>> idx.check_fingerprint(session.fingerprint, "model.zip")
    >>> hits = idx.search(query[None], k=10, space="image")[0]
    """

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = Path(folder)
        self.meta = meta
        self._records: list[dict[str, Any]] | None = None
        self._vectors: dict[str, np.ndarray] = {}
        self._ann: dict[str, AnnIndex] = {}

    # --- open / create --------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, fingerprint: str, dim: int, bundle: str = "") -> "VectorIndex":
        """A new, empty index (the folder may exist but must not hold an index).

        >>> VectorIndex.create("demo/index", session.fingerprint, 512, "model.zip")
        """
        folder = Path(folder)
        if (folder / "index.json").exists():
            raise IndexStoreError(f"{folder}: already holds an index")
        meta = {"format": INDEX_FORMAT, "bundle_fingerprint": fingerprint, "bundle": bundle, "dim": int(dim),
                "spaces": list(SPACES), "metric": "inner product of unit vectors (cosine)",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (folder / "segments").mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "index.json", meta)
        return cls(folder, meta)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "VectorIndex":
        """Open an existing index; a clear error when the folder is not one.

        >>> VectorIndex.open("demo/index").count
        """
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            raise IndexStoreError(f"{folder}: not a retrieval index (no index.json); build one with `decipher-mr index build`")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexStoreError(f"{path}: damaged ({exc})") from exc
        if not isinstance(meta, dict) or "bundle_fingerprint" not in meta or "dim" not in meta:
            raise IndexStoreError(f"{path}: not a retrieval index description")
        if int(meta.get("format", 0)) > INDEX_FORMAT:
            raise IndexStoreError(f"{path}: index format {meta['format']} is newer than this version reads")
        return cls(folder, meta)

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, fingerprint: str, dim: int, bundle: str = "") -> "VectorIndex":
        folder = Path(folder)
        if (folder / "index.json").exists():
            idx = cls.open(folder)
            idx.check_fingerprint(fingerprint, bundle)
            return idx
        return cls.create(folder, fingerprint, dim, bundle)

    def check_fingerprint(self, fingerprint: str, bundle: str = "") -> None:
        """Refuse to mix embeddings of two different models."""
        if fingerprint != self.meta["bundle_fingerprint"]:
            raise IndexMismatchError(
                f"{self.folder}: this index was built with another model bundle ({self.meta.get('bundle') or 'unknown'}, "
                f"fingerprint {self.meta['bundle_fingerprint'][:12]}); {bundle or 'the given bundle'} has fingerprint "
                f"{fingerprint[:12]}. Its embeddings are not comparable: rebuild the index with this bundle")

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    # --- segments -------------------------------------------------------------------------------
    def _segments(self) -> list[Path]:
        seg = self.folder / "segments"
        return sorted(seg.glob("[0-9]*.json")) if seg.is_dir() else []

    @property
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            out: list[dict[str, Any]] = []
            for path in self._segments():
                try:
                    out += json.loads(path.read_text(encoding="utf-8"))["records"]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as exc:
                    raise IndexStoreError(f"{path}: damaged segment ({type(exc).__name__})") from exc
            self._records = out
        return self._records

    @property
    def count(self) -> int:
        return len(self.records)

    def ids(self) -> set[str]:
        return {r["id"] for r in self.records}

    def vectors(self, space: str) -> np.ndarray:
        """All embeddings of a space (N, dim), memory-mapped when there is one segment."""
        if space not in SPACES:
            raise IndexStoreError(f"unknown search space {space!r}; spaces: {', '.join(SPACES)}")
        if space not in self._vectors:
            parts = []
            for path in self._segments():
                arr_path = path.with_suffix(f".{space}.npy")
                arr = np.load(arr_path, mmap_mode="r", allow_pickle=False)
                n = len(json.loads(path.read_text(encoding="utf-8"))["records"])
                if arr.shape != (n, self.dim):
                    raise IndexStoreError(f"{arr_path}: shape {arr.shape} does not match its {n} records of dim {self.dim}")
                parts.append(arr)
            if not parts:
                self._vectors[space] = np.zeros((0, self.dim), np.float32)
            else:
                self._vectors[space] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._vectors[space]

    def valid(self, space: str) -> np.ndarray:
        if space == "report":
            return np.array([bool(r.get("has_report")) for r in self.records], dtype=bool)
        return np.ones(self.count, dtype=bool)

    def append(self, records: Sequence[dict[str, Any]], image: np.ndarray, report: np.ndarray) -> Path:
        """Commit one new segment (arrays first, its records last). Returns the segment's json path.

        >>> idx.append([{"id": "s1", "has_report": True, ...}], img_vecs, rep_vecs)
        """
        n = len(records)
        image, report = np.asarray(image, np.float32), np.asarray(report, np.float32)
        if image.shape != (n, self.dim) or report.shape != (n, self.dim):
            raise IndexStoreError(f"{self.folder}: append needs ({n}, {self.dim}) arrays, got {image.shape} and {report.shape}")
        segs = self._segments()
        number = int(segs[-1].stem) + 1 if segs else 0
        base = self.folder / "segments" / f"{number:06d}"
        atomic_save_npy(base.with_suffix(".image.npy"), image)
        atomic_save_npy(base.with_suffix(".report.npy"), report)
        atomic_write_json(base.with_suffix(".json"), {"count": n, "records": list(records)}, indent=None)
        self._records, self._vectors = None, {}
        return base.with_suffix(".json")

    # --- search ---------------------------------------------------------------------------------
    def _ann_for(self, space: str) -> AnnIndex:
        vectors, valid = self.vectors(space), self.valid(space)
        n = len(vectors)
        path, info_path = self.folder / "ann" / f"{space}.faiss", self.folder / "ann" / f"{space}.json"
        ann = self._ann.get(space)
        if ann is None and path.is_file() and info_path.is_file():
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if info.get("bundle_fingerprint") == self.meta["bundle_fingerprint"] and info.get("rows", 0) <= n:
                ann = AnnIndex.load(path, info["nlist"], info["trained_rows"], covered=int(info["rows"]))
        rows = int(valid.sum())
        stale = ann is None or (rows > RETRAIN_GROWTH * max(ann.trained_rows, 1) and (ann.nlist > 0 or rows >= MIN_IVF_ROWS))
        if stale:
            ann = AnnIndex.train(vectors[valid])
        if ann.covered < n:
            new = np.arange(ann.covered, n)[valid[ann.covered:]]
            ann.add(vectors[new], new)
            ann.covered = n
            ann.save(path)
            atomic_write_json(info_path, {"rows": n, "nlist": ann.nlist, "trained_rows": ann.trained_rows,
                                          "bundle_fingerprint": self.meta["bundle_fingerprint"]})
        self._ann[space] = ann
        return ann

    def search(self, queries: np.ndarray, k: int = 10, space: str = "image", exact: bool = False,
               nprobe: int = DEFAULT_NPROBE) -> "list[list[RetrievalHit]]":
        """Top-``k`` rows per query (Q, dim) as :class:`~decipher_mr.inference.results.RetrievalHit`.

        >>> idx.search(session.embed_text("meningioma").numpy(), k=5, space="image", exact=True)
        """
        from decipher_mr.inference.results import RetrievalHit

        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise IndexStoreError(f"{self.folder}: queries have {queries.shape[1]} dims, the index {self.dim}")
        if int(k) < 1:
            raise IndexStoreError(f"k must be at least 1, got {k}")
        if exact:
            scores, rows = exact_search(self.vectors(space), queries, k, self.valid(space))
        else:
            scores, rows = self._ann_for(space).search(queries, k, nprobe)
        records = self.records
        out = []
        for s_row, r_row in zip(scores, rows):
            hits = [RetrievalHit(rank, float(s), int(r), dict(records[int(r)]))
                    for rank, (s, r) in enumerate(((s, r) for s, r in zip(s_row, r_row) if r >= 0), start=1)]
            out.append(hits)
        return out
