"""Retrieval evaluation of an aligned model on a prepared cache, written as JSON and Markdown.

``evaluate_retrieval`` embeds every item of a split once (centred deterministic image views, the
same preprocessing as training without augmentation) and computes retrieval, body-region top-3
and zero-shot metrics from those embeddings. The Markdown report holds numbers only, never report
text (patient data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from decipher_mr.data.cache import PreparedCache
from decipher_mr.eval.retrieval import region_retrieval_top_k, report_keys, retrieval_metrics
from decipher_mr.eval.zero_shot import zero_shot_report
from decipher_mr.models.clip import ImageTextModel
from decipher_mr.storage import atomic_write_json, atomic_write_text

DEFAULT_IMAGE = {"size": [64, 64, 64], "mode": "crop"}


@torch.no_grad()
def embed_split(model: ImageTextModel, cache: PreparedCache, indices: list[int], image_cfg: dict[str, Any],
                batch_size: int = 8, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and report embeddings (N, D) of cache items ``indices``."""
    from decipher_mr.train.align_views import image_batch

    model.eval()
    image_parts = []
    for s in tqdm(range(0, len(indices), batch_size), desc="embed images", disable=not progress, leave=False):
        image_parts.append(model.encode_image(image_batch(cache, indices[s : s + batch_size], image_cfg, None)))
    reports = [cache.items[i].report or "" for i in indices]
    return torch.cat(image_parts), model.encode_reports(reports)


def evaluate_retrieval(model: ImageTextModel, cache: PreparedCache, split: str = "test",
                       image_cfg: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Every retrieval and zero-shot metric on ``split`` (items with a report).

    >>> result = evaluate_retrieval(load_image_text_model("runs/align"), PreparedCache("demo/cache"))
    """
    indices = [i for i in cache.indices(split=split) if cache.items[i].report]
    if len(indices) < 2:
        raise ValueError(f"{cache.root}: split {split!r} has {len(indices)} item(s) with a report; need at least 2")
    image_cfg = dict(image_cfg or DEFAULT_IMAGE)
    image, text = embed_split(model, cache, indices, image_cfg, progress=progress)
    items = [cache.items[i] for i in indices]
    return {
        "split": split,
        "n": len(indices),
        "retrieval": retrieval_metrics(image, text, keys=report_keys([it.report for it in items])),
        "body_region_top3": region_retrieval_top_k(image, text, [it.body_region for it in items], k=3),
        "zero_shot": zero_shot_report(image, items, model.encode_reports),
        "image_view": image_cfg,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown_report(result: dict[str, Any], title: str = "Retrieval evaluation") -> str:
    """A short readable summary of :func:`evaluate_retrieval`'s result (numbers only)."""
    r = result["retrieval"]
    lines = [f"# {title}", "", f"Split `{result['split']}`, {result['n']} image–report pairs.", "",
             "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
    for name in ("image_to_report", "report_to_image", "chance"):
        m = r[name]
        lines.append(f"| {name.replace('_', ' ')} | {_fmt(m['R@1'])} | {_fmt(m['R@5'])} | {_fmt(m['R@10'])} | "
                     f"{_fmt(m['median_rank'])} |")
    b = result["body_region_top3"]
    lines += ["", f"Body-region top-3: image→report {_fmt(b['image_to_report'])}, report→image "
                  f"{_fmt(b['report_to_image'])} (chance {_fmt(b['chance'])}).", "", "## Zero-shot by text prompts", ""]
    for task, m in result["zero_shot"].items():
        if "skipped" in m:
            lines.append(f"- {task}: skipped ({m['skipped']})")
        elif "auc" in m:
            lines.append(f"- {task}: accuracy {_fmt(m['accuracy'])}, AUC {_fmt(m['auc'])} (chance 0.5), n={m['n']}")
        else:
            lines.append(f"- {task}: accuracy {_fmt(m['accuracy'])}, balanced {_fmt(m['balanced_accuracy'])} "
                         f"(chance {_fmt(m['chance_accuracy'])}), classes {', '.join(m['classes'])}, n={m['n']}")
    lines += ["", "_Research use only; generated demo reports are not clinical data._", ""]
    return "\n".join(lines)


def write_retrieval_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``retrieval.json`` and ``retrieval.md`` atomically; return their paths."""
    out = Path(out_dir)
    atomic_write_json(out / "retrieval.json", json.loads(json.dumps(result, default=float)))
    atomic_write_text(out / "retrieval.md", markdown_report(result))
    return out / "retrieval.json", out / "retrieval.md"
