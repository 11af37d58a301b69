"""Retrieval and zero-shot evaluation through the path users run: a bundle's :class:`Session`.

Every image embedding is ``Session.image_embedding(path)`` of the split's original files (reading,
preprocessing, the recorded image view, the projection), every report embedding
``Session.embed_reports``; with ``index`` the volume→report search is the index's own search
(``Session.retrieve_reports(volume, index=...)``), i.e. *Reports like this volume* in Slicer and the
viewer. Every figure has a 95% bootstrap interval by study, its count and its chance level
(:mod:`decipher_mr.eval.stats`). Report text is read to embed it and never written or logged.

>>> result = evaluate_served(Session.from_bundle("demo/bundle.zip"), "demo/data/manifest.jsonl", "test")
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from decipher_mr.data.manifest import read_manifest
from decipher_mr.eval.retrieval import relevance, chance_rank, chance_recall, partner_ranks, report_keys
from decipher_mr.eval.stats import TABLE_HEAD, estimate, mean_estimate, table_row
from decipher_mr.eval.zero_shot import (LESION_PROMPTS, NORMAL_PROMPTS, class_embeddings, lesion_of, region_prompts,
                                        roc_auc, sequence_prompts)

KS = (1, 5, 10)


def _report_text(row) -> str | None:
    if row.report_text:
        return row.report_text
    if row.report and Path(row.report).is_file():
        return Path(row.report).read_text(encoding="utf-8", errors="replace")
    return None


def embed_rows(session, rows: Sequence[Any], progress: bool = True) -> tuple[list[Any], torch.Tensor, list[str], list[str]]:
    """``(kept rows, image embeddings (N, D), report texts, problems)``: a volume that cannot be read
    is reported (file and reason) and left out; the rest goes on."""
    kept, vecs, texts, problems = [], [], [], []
    for row in tqdm(rows, desc="embed volumes (Session)", unit="volume", disable=not progress, leave=False):
        text = _report_text(row)
        if text is None:
            problems.append(f"{row.where}: no report to pair with {row.image}")
            continue
        try:
            vecs.append(session.image_embedding(row.image))
        except Exception as exc:  # one bad volume must not sink the evaluation
            problems.append(f"{row.image}: {exc}")
            continue
        kept.append(row)
        texts.append(text)
    if not vecs:
        return kept, torch.empty((0, 0)), texts, problems
    return kept, torch.stack(vecs).float(), texts, problems


def _balanced_accuracy(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    recalls = [float((pred[true == c] == c).mean()) for c in range(n_classes) if (true == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def zero_shot_class(image: torch.Tensor, truth: Sequence[str | None], prompts: dict[str, list[str]], encode,
                    groups: Sequence[Any]) -> dict[str, Any]:
    """Balanced accuracy of nearest-prompt classification with its interval; chance 1/C."""
    keep = [i for i, t in enumerate(truth) if t is not None and t in prompts]
    if len(prompts) < 2 or len(keep) < 2:
        return {"skipped": "fewer than two classes or labelled items"}
    names, cls = class_embeddings(prompts, encode)
    pred = (image[keep].float() @ cls.T).argmax(1).cpu().numpy()
    true = np.array([names.index(truth[i]) for i in keep])
    e = estimate(lambda idx: _balanced_accuracy(pred[idx], true[idx], len(names)), [groups[i] for i in keep],
                 chance=1.0 / len(names))
    return {**e, "classes": names, "accuracy": float((pred == true).mean())}


def zero_shot_lesion(image: torch.Tensor, rows: Sequence[Any], encode, groups: Sequence[Any]) -> dict[str, Any]:
    """Lesion vs normal ROC AUC (best lesion prompt minus normal prompt) with its interval; chance 0.5."""
    known = [(i, *lesion_of(SimpleNamespace(labels=r.labels))) for i, r in enumerate(rows)]
    known = [(i, has, where) for i, has, where in known if has is not None]
    if not known or all(h for _, h, _ in known) or not any(h for _, h, _ in known):
        return {"skipped": "needs items with and without a lesion in their labels"}
    _, normal = class_embeddings({"normal": NORMAL_PROMPTS}, encode)
    places = sorted({w for _, _, w in known if w})
    _, lesion_vecs = class_embeddings({"lesion": LESION_PROMPTS, **{p: [f"lesion in the {p}"] for p in places}}, encode)
    scores = np.array([float((lesion_vecs @ image[i].float()).max() - image[i].float() @ normal[0]) for i, _, _ in known])
    positive = np.array([h for _, h, _ in known])
    return estimate(lambda idx: roc_auc(scores[idx], positive[idx]), [groups[i] for i, _, _ in known], chance=0.5)


def region_precision(sim: torch.Tensor, regions: Sequence[str], k: int, groups: Sequence[Any]) -> dict[str, Any]:
    """Precision@k of same-region reports among each volume's top ``k``; chance: the same-region share."""
    labels = np.array([r or "unknown" for r in regions])
    top = torch.topk(sim, min(k, sim.shape[1]), dim=1).indices.numpy()
    per_query = (labels[top] == labels[:, None]).mean(1)
    chance = float(np.mean([(labels == lab).mean() for lab in labels]))
    return mean_estimate(per_query, groups, chance=chance)


def within_region_recall(sim: torch.Tensor, regions: Sequence[str], k: int, groups: Sequence[Any],
                         keys: Sequence[Any] | None = None) -> dict[str, Any]:
    """Image→report R@k among the reports of the query's own body region only (findings, sides and sequences
    must separate them; the region does not help); an identical report text counts as the query's own
    (``keys``); chance: a random ranking of that region's reports."""
    labels = np.array([r or "unknown" for r in regions])
    rel = relevance(len(labels), keys)
    hits, chances = [], []
    for i, lab in enumerate(labels):
        same = np.flatnonzero(labels == lab)
        row, ok = sim[i, same].float().numpy(), rel[i, same]
        rank = int(((row >= row[ok].max()) & ~ok).sum()) + 1  # ties with a wrong report count against
        hits.append(float(rank <= k))
        chances.append(chance_recall(len(same), [int(ok.sum())], k))
    return mean_estimate(hits, groups, chance=float(np.mean(chances)))


def index_region_precision(session, rows: Sequence[Any], index, k: int = 5, progress: bool = True) -> dict[str, Any]:
    """*Reports like this volume* as users get it: ``Session.retrieve_reports(volume, index=...)`` for each
    volume; precision@k of hits from the volume's body region (the volume's own report excluded)."""
    from decipher_mr.index import VectorIndex

    idx = index if isinstance(index, VectorIndex) else VectorIndex.open(Path(index))
    records = list(idx.records)
    with_report = [r for r in records if r.get("has_report", True)]
    per_query, groups, chances = [], [], []
    for row in tqdm(rows, desc="search the index (Session)", unit="volume", disable=not progress, leave=False):
        hits = session.retrieve_reports(row.image, index=idx, k=k + 1)
        others = [h for h in hits if h.metadata.get("study_id") != row.study_id and h.metadata.get("id") != row.id][:k]
        if not others:
            continue
        per_query.append(float(np.mean([h.metadata.get("body_region") == row.body_region for h in others])))
        pool = [r for r in with_report if r.get("study_id") != row.study_id]
        chances.append(float(np.mean([r.get("body_region") == row.body_region for r in pool])) if pool else float("nan"))
        groups.append(row.study_id or row.id)
    return mean_estimate(per_query, groups, chance=float(np.nanmean(chances)) if chances else None)


def evaluate_served(session, manifest: str | Path, split: str = "test", index: str | Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Every retrieval and zero-shot figure of ``split`` through ``session`` (see the module)."""
    rows, errors = read_manifest(manifest, strict=False)
    rows = [r for r in rows if (r.split or "train") == split]
    kept, image, texts, problems = embed_rows(session, rows, progress)
    problems = [str(e) for e in errors] + problems
    if len(kept) < 2:
        raise ValueError(f"{manifest}: split {split!r} has {len(kept)} usable image-report pair(s); need at least 2"
                         + (f" ({'; '.join(problems[:3])})" if problems else ""))
    report_vecs = session.embed_reports(texts).float()
    groups = [r.study_id or r.id for r in kept]
    sim = image @ report_vecs.T
    n = len(kept)
    out: dict[str, Any] = {"split": split, "n": n, "studies": len(set(groups)), "problems": problems,
                           "image_view": getattr(session.model, "image_view", None), "figures": {}}
    figs = out["figures"]
    keys = report_keys(texts)  # identical report texts are the same answer
    correct = relevance(n, keys).sum(1)
    out["distinct_reports"] = len(set(keys))
    for name, s in (("image→report", sim), ("report→image", sim.T)):
        ranks = partner_ranks(s, keys)
        for k in KS:
            figs[f"{name} R@{k}"] = mean_estimate((ranks <= k).astype(float), groups, chance=chance_recall(n, correct, k))
        figs[f"{name} median rank"] = estimate(lambda idx, r=ranks: float(np.median(r[idx])), groups,
                                               chance=chance_rank(n, correct), higher_is_better=False)
    regions = [r.body_region for r in kept]
    figs["volume→report body-region precision@5 (split)"] = region_precision(sim, regions, 5, groups)
    figs["image→report R@5 within the body region"] = within_region_recall(sim, regions, 5, groups, keys)
    encode = session.embed_text
    names = sorted({r for r in regions if r})
    figs["zero-shot body region (balanced accuracy)"] = zero_shot_class(
        image, regions, {r: region_prompts(r) for r in names}, encode, groups)
    seqs = [r.sequence for r in kept]
    figs["zero-shot sequence (balanced accuracy)"] = zero_shot_class(
        image, seqs, {s: sequence_prompts(s) for s in sorted({s for s in seqs if s})}, encode, groups)
    figs["zero-shot lesion vs normal (AUC)"] = zero_shot_lesion(image, kept, encode, groups)
    if index is not None:
        figs["Reports like this volume: body-region precision@5 (index)"] = index_region_precision(
            session, kept, index, 5, progress)
    return out


def markdown(result: dict[str, Any], title: str = "Retrieval and zero-shot, through the served path") -> str:
    """The figures as one table (numbers only, never report text)."""
    lines = [f"# {title}", "", f"Split `{result['split']}`: {result['n']} image–report pairs from {result['studies']} "
             f"studies ({result.get('distinct_reports', result['n'])} distinct report texts: identical texts count as "
             f"the same answer); image view {result.get('image_view')}. Intervals: 95% bootstrap by study.", "",
             *TABLE_HEAD]
    for name, e in result["figures"].items():
        if "skipped" in e:
            lines.append(f"| {name} | skipped: {e['skipped']} | | | |")
        else:
            lines.append(table_row(name, e))
    if result.get("problems"):
        lines += ["", f"{len(result['problems'])} item(s) left out:"] + [f"- {p}" for p in result["problems"][:20]]
    lines += ["", "_Research use only; generated demo reports are not clinical data._", ""]
    return "\n".join(lines)


def finite(v: Any) -> Any:
    """JSON-safe copy (NaN → None)."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
