"""Cross-modal retrieval metrics on paired image/report embeddings.

Item ``i``'s image and report are a pair; a query counts as answered at rank r when its own partner
is the r-th most similar item (1-based). Ties are broken against the query (an item tied with the
partner counts as ranked above it), so a constant model scores at chance, never above it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def partner_ranks(similarity: torch.Tensor) -> np.ndarray:
    """1-based rank of the diagonal entry in each row of a square similarity matrix.

    >>> partner_ranks(torch.eye(3))
    array([1, 1, 1])
    """
    sim = similarity.float()
    own = sim.diagonal().unsqueeze(1)
    better = (sim > own).sum(1)
    ties = (sim == own).sum(1) - 1  # the diagonal itself is not a tie
    return (better + ties + 1).cpu().numpy().astype(np.int64)


def recall_at(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks <= k).mean()) for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Image→report and report→image recall@k and median rank, with the chance level of each k.

    >>> m = retrieval_metrics(img_emb, txt_emb)
    >>> m["image_to_report"]["R@10"], m["chance"]["R@10"]
    """
    n = image.shape[0]
    if text.shape[0] != n:
        raise ValueError(f"{n} images but {text.shape[0]} reports: retrieval needs pairs")
    sim = image.float() @ text.float().T
    out: dict[str, dict[str, float]] = {}
    for name, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        ranks = partner_ranks(s)
        out[name] = {**recall_at(ranks, ks), "median_rank": float(np.median(ranks)), "mean_rank": float(ranks.mean())}
    out["chance"] = {f"R@{k}": min(1.0, k / n) for k in ks}
    out["chance"]["median_rank"] = (n + 1) / 2
    out["n"] = {"pairs": float(n)}
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
