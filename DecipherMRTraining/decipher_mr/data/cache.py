"""Reading the prepared cache that ``decipher-mr prepare`` writes.

Layout of a cache folder (format version 1)::

    CACHE/
      cache.json            {"format": 1, "preprocess": {...the PreprocessConfig used...}}
      index.jsonl           one JSON object per prepared series (see ``CacheItem``)
      items/<id>.npy        float32 array [i, j, k] in the canonical orientation, normalised
      items/<id>.mask.npy   optional uint8/int16 label array on the same grid
      items/<id>.regions.npy  optional anatomical label map (e.g. AAL), index extra key ``regions``
      failures.json         the items that failed in the last run, with the reason

Each index row's extra key ``geometry`` is the ``GeometryRecord`` (decipher_mr.data.preprocess) that
maps the prepared grid back to the source series (``restore``).

Arrays are plain ``.npy`` files opened with ``mmap_mode="r"``: loading costs a page-in, not a decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FORMAT = 1


@dataclass
class CacheItem:
    """One prepared series: where its arrays are and what is known about it."""

    id: str
    array: str  # relative to the cache folder
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    body_region: str | None = None
    sequence: str | None = None
    split: str | None = None
    study_id: str | None = None
    report: str | None = None  # patient data: never logged
    labels: dict[str, Any] = field(default_factory=dict)
    mask: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "CacheItem":
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj and k != "extra"}
        extra = {k: v for k, v in obj.items() if k not in cls.__dataclass_fields__}
        known["shape"] = tuple(known["shape"])
        known["spacing"] = tuple(known["spacing"])
        return cls(**known, extra={**obj.get("extra", {}), **extra})

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        out["shape"] = list(self.shape)
        out["spacing"] = list(self.spacing)
        out.update(self.extra)
        return out


class CacheError(RuntimeError):
    pass


class PreparedCache:
    """Fast read access to a prepared cache.

    >>> cache = PreparedCache("demo/cache")
    >>> item = cache.items[0]; vol = cache.load(0)      # memory-mapped float32 [i, j, k]
    >>> train = cache.select(split="train", body_region="brain")
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "index.jsonl"
        if not index.exists():
            raise CacheError(f"{self.root}: not a prepared cache (no index.jsonl); run `decipher-mr prepare` first")
        meta_path = self.root / "cache.json"
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        fmt = self.meta.get("format", CACHE_FORMAT)
        if fmt > CACHE_FORMAT:
            raise CacheError(f"{meta_path}: cache format {fmt} is newer than this version understands ({CACHE_FORMAT})")
        self.items: list[CacheItem] = []
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    self.items.append(CacheItem.from_json(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CacheError(f"{index}:{n}: damaged index line ({exc})") from exc

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, **where: Any) -> list[int]:
        """Positions of items whose attributes equal every given value (``None`` values are ignored)."""
        return [
            i
            for i, it in enumerate(self.items)
            if all(v is None or getattr(it, k, it.extra.get(k)) == v for k, v in where.items())
        ]

    def select(self, **where: Any) -> list[CacheItem]:
        return [self.items[i] for i in self.indices(**where)]

    def load(self, i: int) -> np.ndarray:
        """The prepared float32 array of item ``i``, memory-mapped read-only."""
        return np.load(self.root / self.items[i].array, mmap_mode="r", allow_pickle=False)

    def load_mask(self, i: int) -> np.ndarray | None:
        mask = self.items[i].mask
        return None if mask is None else np.load(self.root / mask, mmap_mode="r", allow_pickle=False)
