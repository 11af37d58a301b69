"""The readable report of ``evaluate heads``: JSON numbers, a Markdown page and PNG figures.

Figures: mask / heatmap overlays on the slice through the target's centre, learning curves
(validation metric against wall-clock seconds, with the SegResNet baseline when present) and the
low-data curve (held-out metric against the fraction of training items, from ``--fraction`` runs).
No report text is ever written; examples are identified by their cache id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from decipher_mr.storage import atomic_path, atomic_write_json, atomic_write_text

PRIMARY = {"classify": "accuracy", "regress": "mae", "segment": "dice", "anomaly": "voxel_auroc",
           "ground": "pointing", "localize": "box_iou"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)


def overlay_figure(example: dict[str, Any], path: Path, title: str) -> Path:
    """Image slice (through the truth's centre along k) with truth contour and prediction/heatmap."""
    plt = _plt()
    truth = np.asarray(example["truth"])
    k = int(np.argwhere(truth > 0)[:, 2].mean()) if truth.any() else truth.shape[2] // 2
    img = np.asarray(example["image"])[:, :, k].T
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax, name in zip(axes, ("truth", "pred" if "pred" in example else "heat")):
        ax.imshow(img, cmap="gray", origin="lower")
        layer = np.asarray(example[name])[:, :, k].T
        if name == "heat":
            ax.imshow(np.ma.masked_less(layer, 0.05), cmap="hot", alpha=0.6, vmin=0, vmax=1, origin="lower")
        else:
            ax.imshow(np.ma.masked_equal(layer, 0), cmap="tab10", alpha=0.5, vmin=0, vmax=9, origin="lower",
                      interpolation="nearest")
        ax.contour(truth[:, :, k].T > 0, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"{name} (slice k={k})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return path


def learning_curve_figure(history: Sequence[dict[str, Any]], task: str, path: Path,
                          baseline: dict[str, Any] | None = None) -> Path:
    plt = _plt()
    key = PRIMARY[task]
    pts = [(h["elapsed_s"], h["val"].get(key)) for h in history if h.get("val") and h["val"].get(key) is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if pts:
        ax.plot(*zip(*pts), marker="o", label=f"{task} head (frozen encoder)")
    if baseline:  # the comparison record: its "baseline" holds SegResNet's curve
        base = baseline["baseline"]
        ax.plot([h["elapsed_s"] for h in base["history"]], [h["dice"] for h in base["history"]], marker="s",
                label=base["model"])
    ax.set_xlabel("wall-clock seconds (head: including feature extraction)")
    ax.set_ylabel(f"validation {key}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def low_data_figure(points: Sequence[tuple[float, float]], task: str, path: Path) -> Path:
    plt = _plt()
    pts = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training items")
    ax.set_ylabel(f"held-out {PRIMARY[task]}")
    ax.set_title(f"{task}: low-data curve", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_heads_report(results: Sequence[dict[str, Any]], out: str | Path,
                       comparison: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``heads.json``, ``heads.md`` and the PNG figures into ``out``.

    >>> write_heads_report([evaluate_head("runs/heads/segment", cache)], "runs/heads/eval")
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# DecipherMR task heads: evaluation", "",
             "Held-out metrics of heads trained on the frozen encoder, each next to its trivial baseline.",
             "Demo data is real anatomy with synthetic lesions and generated reports: not clinical evidence.", ""]
    lines += ["| run | task | items | metric | head | baseline |", "|---|---|---|---|---|---|"]
    figures: list[str] = []
    low_data: dict[str, list[tuple[float, float]]] = {}
    for n, res in enumerate(results):
        task = res["task"]
        key = PRIMARY[task]
        lines.append(f"| {Path(res['run']).name} | {task} | {res['n']} | {key} | {_fmt(res['metrics'].get(key))} | "
                     f"{_fmt(res['baseline'].get(key))} ({res['baseline'].get('name')}) |")
        history_path = Path(res["run"]) / "history.json"
        if history_path.exists():
            hist = json.loads(history_path.read_text(encoding="utf-8"))
            low_data.setdefault(task, []).append((float(hist.get("fraction", 1.0)), float(res["metrics"].get(key, float("nan")))))
            base = comparison if comparison and comparison.get("run") == res["run"] else None
            figures.append(learning_curve_figure(hist.get("history", []), task, out / f"curve-{n}-{task}.png", base).name)
        for e, ex in enumerate(res.get("examples", [])[:2]):
            figures.append(overlay_figure(ex, out / f"overlay-{n}-{task}-{e}.png", f"{task}: {ex['id']}").name)
    for task, pts in low_data.items():
        if len({p[0] for p in pts}) > 1:
            figures.append(low_data_figure(pts, task, out / f"low-data-{task}.png").name)
    if comparison:
        lines += ["", "## Segmentation head vs. SegResNet from scratch (same split, same wall-clock budget)", "",
                  f"- head Dice (validation, end of training): {_fmt(comparison['head_final_dice'])}",
                  f"- SegResNet Dice after {comparison['baseline']['budget_s']:.0f} s: {_fmt(comparison['baseline']['final_dice'])}",
                  f"- time to reach SegResNet's final Dice: head {_fmt(comparison['head_time_to_baseline'])} s, "
                  f"SegResNet {_fmt(comparison['baseline_time_to_baseline'])} s"]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    md = out / "heads.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    js = out / "heads.json"
    clean = [{k: v for k, v in r.items() if k != "examples"} for r in results]
    atomic_write_json(js, {"results": clean, "comparison": comparison})
    return js, md
