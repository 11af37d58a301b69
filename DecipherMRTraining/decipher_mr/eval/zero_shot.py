"""Zero-shot classification by text prompts: the class whose prompt embedding is nearest wins.

Each class has a few prompts; their unit embeddings are averaged and re-normalised (prompt
ensembling, as in CLIP). Tasks are read off the prepared cache's items:

* ``body_region``: "MRI of the brain", "MRI of the knee", ...
* ``sequence``: "T1-weighted MRI", "T2-weighted MRI", "FLAIR MRI", ...
* ``lesion``: the best of the lesion prompts (generic, and "lesion in the left frontal lobe" for
  every place named in the split's labels) against "normal study"; accuracy and ROC AUC.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import CacheItem

SEQUENCE_PROMPTS = {
    "T1": ["T1-weighted MRI", "T1 weighted image"],
    "T2": ["T2-weighted MRI", "T2 weighted image"],
    "FLAIR": ["FLAIR MRI", "T2 FLAIR image"],
    "PD": ["proton density weighted MRI"],
    "DWI": ["diffusion-weighted MRI"],
}
NORMAL_PROMPTS = ["normal study", "no focal lesion, normal MRI"]
LESION_PROMPTS = ["MRI with a focal lesion", "a lesion is present"]


def region_prompts(region: str) -> list[str]:
    name = region.replace("_", " ")
    return [f"MRI of the {name}", f"{name} MRI"]


def sequence_prompts(sequence: str) -> list[str]:
    return SEQUENCE_PROMPTS.get(sequence.upper(), [f"{sequence} MRI"])


def lesion_of(item: CacheItem) -> tuple[bool | None, str | None]:
    """``(has lesion, where)`` from an item's labels (``None`` when the labels do not say)."""
    labels = item.labels or {}
    where = None
    for key in ("lesion_location", "lesion_region", "location"):
        if isinstance(labels.get(key), str) and labels[key]:
            where = labels[key].replace("_", " ")
            break
    for key in ("lesion_present", "lesion", "has_lesion", "abnormal"):
        if key in labels and labels[key] is not None:
            value = labels[key]
            return (bool(value) if not isinstance(value, str) else value.lower() not in ("", "0", "false", "none", "no")), where
    return (True if where else None), where


def class_embeddings(prompts: dict[str, list[str]], encode_text: Callable[[list[str]], torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Class names and their ensembled unit prompt embeddings (C, D)."""
    names = list(prompts)
    flat = [p for n in names for p in prompts[n]]
    emb = F.normalize(encode_text(flat).float(), dim=-1)
    out, pos = [], 0
    for n in names:
        k = len(prompts[n])
        out.append(F.normalize(emb[pos : pos + k].mean(0), dim=-1))
        pos += k
    return names, torch.stack(out)


def classify(image: torch.Tensor, truth: Sequence[str | None], prompts: dict[str, list[str]],
             encode_text: Callable[[list[str]], torch.Tensor]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class recall of nearest-prompt classification.

    >>> classify(img_emb, ["brain", "knee"], {"brain": ["MRI of the brain"], "knee": ["MRI of the knee"]}, enc)
    """
    keep = [i for i, t in enumerate(truth) if t is not None and t in prompts]
    if len(prompts) < 2 or not keep:
        return {"skipped": "fewer than two classes or no labelled items"}
    names, cls = class_embeddings(prompts, encode_text)
    pred = (image[keep].float() @ cls.T).argmax(1).cpu().numpy()
    true = np.array([names.index(truth[i]) for i in keep])
    per_class = {n: float((pred[true == c] == c).mean()) for c, n in enumerate(names) if (true == c).any()}
    return {
        "n": len(keep),
        "classes": names,
        "accuracy": float((pred == true).mean()),
        "balanced_accuracy": float(np.mean(list(per_class.values()))),
        "per_class_recall": per_class,
        "chance_accuracy": 1.0 / len(names),
    }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def lesion_task(image: torch.Tensor, items: Sequence[CacheItem], encode_text: Callable[[list[str]], torch.Tensor]) -> dict[str, Any]:
    """Lesion vs normal: best lesion prompt (generic or "lesion in the X" for every X of the split) minus normal."""
    known = [(i, *lesion_of(it)) for i, it in enumerate(items)]
    known = [(i, has, where) for i, has, where in known if has is not None]
    if not known or all(h for _, h, _ in known) or not any(h for _, h, _ in known):
        return {"skipped": "needs items with and without a lesion in their labels"}
    _, normal = class_embeddings({"normal": NORMAL_PROMPTS}, encode_text)
    places = sorted({w for _, _, w in known if w})
    names = {"lesion": LESION_PROMPTS, **{f"lesion in the {p}": [f"lesion in the {p}"] for p in places}}
    _, lesion_vecs = class_embeddings(names, encode_text)
    scores, positive = [], []
    for i, has, _ in known:
        # every item is scored the same way (its best lesion prompt vs normal): using the true place
        # for positives only would leak the label into the score
        v = image[i].float()
        scores.append(float((lesion_vecs @ v).max() - v @ normal[0]))
        positive.append(has)
    s, p = np.array(scores), np.array(positive)
    return {
        "n": len(known),
        "positives": int(p.sum()),
        "accuracy": float(((s > 0) == p).mean()),
        "auc": roc_auc(s, p),
        "chance_auc": 0.5,
    }


def zero_shot_report(image: torch.Tensor, items: Sequence[CacheItem], encode_text: Callable[[list[str]], torch.Tensor]) -> dict[str, Any]:
    """All zero-shot tasks the items' labels allow.

    >>> zero_shot_report(img_emb, cache.select(split="test"), model.encode_reports)
    """
    regions = sorted({it.body_region for it in items if it.body_region})
    sequences = sorted({it.sequence for it in items if it.sequence})
    return {
        "body_region": classify(image, [it.body_region for it in items], {r: region_prompts(r) for r in regions}, encode_text),
        "sequence": classify(image, [it.sequence for it in items], {s: sequence_prompts(s) for s in sequences}, encode_text),
        "lesion": lesion_task(image, items, encode_text),
    }
