"""Cross-modal retrieval metrics on paired image/report embeddings.

Item ``i``'s image and report are a pair; a query counts as answered at rank r when a correct answer is
the r-th most similar item (1-based). The correct answers of query ``i`` are its own partner and, when
``keys`` are given, every item with the same key: identical report texts (templated normal reports are
common in real exports), which no model can tell apart, so ranking a twin first is not a miss. Ties
with a wrong answer are broken against the query, so a constant model scores at chance, never above.
Chance is that of a random ranking: at least one of the m correct answers among n in the top k.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb
from typing import Any, Sequence

import numpy as np
import torch


def report_keys(texts: Sequence[str | None]) -> list[str | None]:
    """What makes two reports the same answer: their text with whitespace normalised."""
    return [" ".join(t.split()) if t else None for t in texts]


def relevance(n: int, keys: Sequence[Any] | None) -> np.ndarray:
    """(n, n) booleans: is item j a correct answer to query i (itself, or an item with the same key)."""
    rel = np.eye(n, dtype=bool)
    if keys is not None:
        ids: dict[Any, int] = {}
        code = np.array([ids.setdefault(x, len(ids)) if x is not None else -1 - i for i, x in enumerate(keys)])
        rel |= code[:, None] == code[None, :]
    return rel


def partner_ranks(similarity: torch.Tensor, keys: Sequence[Any] | None = None) -> np.ndarray:
    """1-based rank of the best-scored correct answer in each row of a square similarity matrix.

    >>> partner_ranks(torch.eye(3))
    array([1, 1, 1])
    """
    sim = similarity.float().cpu()
    rel = torch.from_numpy(relevance(sim.shape[0], keys))
    best = sim.masked_fill(~rel, float("-inf")).max(1, keepdim=True).values
    return (((sim >= best) & ~rel).sum(1) + 1).numpy().astype(np.int64)


def chance_recall(n: int, correct: Sequence[int] | np.ndarray, k: int) -> float:
    """Mean over queries of P(a random ranking of n items puts one of the query's m correct ones in its top k),
    computed exactly (one correct answer each: exactly k / n)."""
    each = [1 - Fraction(comb(n - int(m), k), comb(n, k)) if k < n else Fraction(1) for m in correct]
    return float(sum(each) / len(each))


def chance_rank(n: int, correct: Sequence[int] | np.ndarray) -> float:
    """Mean over queries of the expected rank of the first of m correct answers in a random ranking."""
    return float(np.mean([(n + 1) / (m + 1) for m in correct]))


def recall_at(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks <= k).mean()) for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      keys: Sequence[Any] | None = None) -> dict[str, dict[str, float]]:
    """Image→report and report→image recall@k and median rank, with the chance level of each k.
    ``keys``: what makes two reports the same answer (:func:`report_keys` of the texts).

    >>> m = retrieval_metrics(img_emb, txt_emb, keys=report_keys(texts))
    >>> m["image_to_report"]["R@10"], m["chance"]["R@10"]
    """
    n = image.shape[0]
    if text.shape[0] != n:
        raise ValueError(f"{n} images but {text.shape[0]} reports: retrieval needs pairs")
    sim = image.float() @ text.float().T
    out: dict[str, dict[str, float]] = {}
    for name, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        ranks = partner_ranks(s, keys)
        out[name] = {**recall_at(ranks, ks), "median_rank": float(np.median(ranks)), "mean_rank": float(ranks.mean())}
    correct = relevance(n, keys).sum(1)
    out["chance"] = {f"R@{k}": chance_recall(n, correct, k) for k in ks}
    out["chance"]["median_rank"] = chance_rank(n, correct)
    distinct = len({k if k is not None else ("no key", i) for i, k in enumerate(keys)}) if keys is not None else n
    out["n"] = {"pairs": float(n), "distinct_reports": float(distinct)}
    return out


def region_retrieval_top_k(image: torch.Tensor, text: torch.Tensor, regions: Sequence[str | None], k: int = 3) -> dict[str, float]:
    """Fraction of queries whose top-``k`` retrieved items (other modality) include their body region.

    >>> region_retrieval_top_k(img_emb, txt_emb, ["brain", "knee", ...])
    """
    labels = np.array([r or "unknown" for r in regions])
    sim = image.float() @ text.float().T
    out = {}
    for name, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        top = torch.topk(s, min(k, s.shape[1]), dim=1).indices.cpu().numpy()
        hits = (labels[top] == labels[:, None]).any(1)
        out[name] = float(hits.mean())
    # chance: probability that k random draws without replacement miss the region entirely
    n = len(labels)
    miss = []
    for lab in labels:
        m = int((labels == lab).sum())
        p = 1.0
        for j in range(min(k, n)):
            p *= max(0, n - m - j) / (n - j)
        miss.append(p)
    out["chance"] = float(1 - np.mean(miss))
    out["k"] = k
    return out
