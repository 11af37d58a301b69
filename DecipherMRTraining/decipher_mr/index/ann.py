"""Exact and approximate inner-product search over unit-norm embeddings, with faiss.

Why faiss (``faiss-cpu``): it is maintained (Meta, regular releases with wheels for Linux, macOS
and Windows), it has exact search (``IndexFlatIP``) and approximate search in the same library and
metric, its IVF index trains by k-means on a sample and then only *adds* vectors (an index grows
without a rebuild), it writes a plain binary file (no pickle), and its AVX2 kernels make a
1,000,000 x 512 IVF build take well under a minute on two CPU cores. HNSW libraries (hnswlib,
usearch) search as fast but build 1M x 512 graphs an order of magnitude slower on two cores;
LanceDB adds a table store we do not need.

The approximate index is IVF-Flat: ``nlist`` = 2 sqrt(N) k-means cells (2000 for a million rows),
trained on 40 points per cell; a query scans the ``nprobe`` = 64 nearest cells (about 3 % of the
rows). On 1M x 512 clustered embeddings that is ~4 ms per query at recall@10 ~0.99 on two cores
(``Testing/bench/bench_inference.py``); finer cells gave better recall per scanned row than
coarser ones with more probes. Below :data:`MIN_IVF_ROWS` rows an exact flat index is used instead (at that size it
is faster than IVF and exact).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from decipher_mr.storage import atomic_path

MIN_IVF_ROWS = 2048
DEFAULT_NPROBE = 64
# k-means on at most this many points per cell, for 10 iterations: the build stays in seconds and
# recall is set by nprobe, not by a perfect clustering.
POINTS_PER_CELL = 40
KMEANS_ITERATIONS = 10


def _faiss():
    import faiss

    return faiss


def as_matrix(x) -> np.ndarray:
    """float32, C-contiguous (N, D): what faiss takes without copying again."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, valid: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` by inner product: ``(scores, rows)`` each (Q, k); rows -1 past the end.

    ``valid`` (N,) bool leaves rows out (a study without a report in the report space).

    >>> scores, rows = exact_search(embeddings, query[None], k=10)
    """
    faiss = _faiss()
    vectors, queries = as_matrix(vectors), as_matrix(queries)
    k = int(k)
    if valid is not None and not valid.all():
        keep = np.flatnonzero(valid)
        scores, rows = exact_search(vectors[keep], queries, k)
        mapped = keep[np.clip(rows, 0, None)] if len(keep) else np.full_like(rows, -1)
        return scores, np.where(rows >= 0, mapped, -1)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    if len(vectors) == 0:
        return scores, rows
    s, r = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    scores[:, : s.shape[1]], rows[:, : r.shape[1]] = s, r
    return scores, rows


class AnnIndex:
    """An approximate (IVF-Flat, or flat when small) inner-product index over row ids.

    >>> ann = AnnIndex.train(embeddings)            # k-means cells on a sample
    >>> ann.add(embeddings, np.arange(len(embeddings)))
    >>> scores, rows = ann.search(queries, k=10)
    """

    def __init__(self, index, nlist: int, trained_rows: int, covered: int = 0):
        self.index, self.nlist, self.trained_rows = index, int(nlist), int(trained_rows)
        self.covered = int(covered)  # rows 0..covered-1 of the store have been added (those that exist)

    @classmethod
    def train(cls, vectors: np.ndarray, nlist: int | None = None, seed: int = 0) -> "AnnIndex":
        faiss = _faiss()
        vectors = as_matrix(vectors)
        n, d = vectors.shape
        if nlist is None:
            nlist = 0 if n < MIN_IVF_ROWS else max(1, int(round(2 * math.sqrt(n))))
        if nlist <= 0:
            return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(d)), 0, n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.max_points_per_centroid = POINTS_PER_CELL
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = vectors if n <= nlist * POINTS_PER_CELL else vectors[np.sort(rng.choice(n, nlist * POINTS_PER_CELL, replace=False))]
        index.train(as_matrix(sample))
        return cls(index, nlist, n)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add rows (no retraining: new vectors go to their nearest existing cell)."""
        if len(ids):
            self.index.add_with_ids(as_matrix(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, nprobe: int = DEFAULT_NPROBE) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, rows)`` each (Q, k), rows -1 where fewer than ``k`` were found."""
        if self.nlist:
            self.index.nprobe = max(1, min(int(nprobe), self.nlist))
        scores, rows = self.index.search(as_matrix(queries), int(k))
        return scores.astype(np.float32), rows.astype(np.int64)

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".faiss") as tmp:
            _faiss().write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: Path, nlist: int, trained_rows: int, covered: int = 0) -> "AnnIndex":
        return cls(_faiss().read_index(str(path)), nlist, trained_rows, covered)
