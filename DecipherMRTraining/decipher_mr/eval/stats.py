"""Error bars for every evaluation figure: a percentile bootstrap over studies, and the chance verdict.

A figure computed on a held-out split rests on few studies; two series of one study are not independent.
:func:`estimate` therefore resamples *studies* (``groups``) with replacement, recomputes the statistic
on every series of the drawn studies, and reports the 2.5th and 97.5th percentiles. A figure whose
interval contains its chance level is marked ``"not distinguishable from chance"``.

>>> e = estimate(lambda idx: float(hits[idx].mean()), groups=study_ids, chance=0.25)
>>> e["value"], e["ci"], e["verdict"]
(0.62, [0.48, 0.75], 'above chance')
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

NOT_DISTINGUISHABLE = "not distinguishable from chance"


def _clean(v: Any) -> float:
    v = float(v)
    return v if math.isfinite(v) else float("nan")


def estimate(stat: Callable[[np.ndarray], float], groups: Sequence[Any], chance: float | None = None,
             n_boot: int = 1000, seed: int = 0, higher_is_better: bool = True) -> dict[str, Any]:
    """``stat(indices)`` on all items, its 95% bootstrap interval by group, the count and the chance verdict.

    ``groups[i]`` is the study of item ``i`` (items of one study are drawn together). Bootstrap draws on
    which the statistic is undefined (NaN, e.g. an AUC of a draw with one class) are left out; the number
    used is reported as ``boot``.
    """
    groups = list(groups)
    n = len(groups)
    if n == 0:
        return {"value": float("nan"), "ci": [float("nan"), float("nan")], "n": 0, "studies": 0,
                "chance": chance, "verdict": "no items"}
    uniq = list(dict.fromkeys(groups))
    members = [np.array([i for i, g in enumerate(groups) if g == u], dtype=np.int64) for u in uniq]
    value = _clean(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), size=len(members))
        v = _clean(stat(np.concatenate([members[p] for p in pick])))
        if not math.isnan(v):
            draws.append(v)
    lo, hi = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if draws else (float("nan"),) * 2
    out = {"value": value, "ci": [lo, hi], "n": n, "studies": len(uniq), "boot": len(draws), "chance": chance}
    out["verdict"] = verdict(lo, hi, chance, higher_is_better)
    return out


def verdict(lo: float, hi: float, chance: float | None, higher_is_better: bool = True) -> str:
    """``"above chance"``, ``"below chance"`` or ``"not distinguishable from chance"`` for an interval."""
    if chance is None:
        return "no chance level"
    if math.isnan(lo) or math.isnan(hi):
        return "undefined"
    if lo <= chance <= hi:
        return NOT_DISTINGUISHABLE
    better = lo > chance if higher_is_better else hi < chance
    return "above chance" if better else "below chance"


def mean_estimate(values: Sequence[float], groups: Sequence[Any], chance: float | None = None, **kw) -> dict[str, Any]:
    """:func:`estimate` of the mean of per-item ``values`` (hits, Dice, distances, ...)."""
    arr = np.asarray(values, dtype=np.float64)
    return estimate(lambda idx: float(np.nanmean(arr[idx])) if len(idx) else float("nan"), groups, chance, **kw)


def median_estimate(values: Sequence[float], groups: Sequence[Any], chance: float | None = None, **kw) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return estimate(lambda idx: float(np.nanmedian(arr[idx])) if len(idx) else float("nan"), groups, chance, **kw)


def fmt_estimate(e: dict[str, Any], digits: int = 3) -> str:
    """``0.620 [0.480, 0.750]`` (n=41 in 41 studies)."""
    if not e or e.get("n", 0) == 0:
        return "n/a"
    lo, hi = e["ci"]
    return f"{e['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table_row(name: str, e: dict[str, Any], digits: int = 3) -> str:
    """One Markdown row: figure, value with interval, n, chance, verdict."""
    chance = "—" if e.get("chance") is None else f"{e['chance']:.{digits}f}"
    return f"| {name} | {fmt_estimate(e, digits)} | {e.get('n', 0)} ({e.get('studies', 0)} studies) | {chance} | {e.get('verdict', '')} |"


TABLE_HEAD = ["| figure | value [95% CI] | n | chance | verdict |", "|---|---|---|---|---|"]
