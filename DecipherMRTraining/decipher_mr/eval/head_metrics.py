"""Metrics of the task heads: Dice and HD95 (MONAI), accuracy/AUROC, MAE, box IoU, heatmap mIoU,
pointing-game accuracy and voxel-wise AUROC. Pure functions of predictions and truths.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from decipher_mr.heads.dense import box_from_mask, box_iou


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged); NaN when one class is absent.

    >>> roc_auc(np.array([0.1, 0.9]), np.array([0, 1]))
    1.0
    """
    from scipy.stats import rankdata

    scores, positive = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive).ravel().astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logits: torch.Tensor, truth: Sequence[int], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro one-vs-rest AUROC (over classes present in ``truth``).

    >>> classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), [0, 1], ["a", "b"])["accuracy"]
    1.0
    """
    truth = np.asarray(truth)
    probs = torch.softmax(logits.float(), -1).numpy()
    acc = float((probs.argmax(1) == truth).mean()) if len(truth) else float("nan")
    aucs = [roc_auc(probs[:, c], truth == c) for c in range(len(labels)) if 0 < (truth == c).sum() < len(truth)]
    return {"accuracy": acc, "auroc": float(np.mean(aucs)) if aucs else float("nan")}


def regression_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean absolute error (over every target) in the target's units."""
    return {"mae": float((pred.float() - truth.float()).abs().mean())}


def dice_hd95(pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, list[float]]:
    """Per foreground class Dice and 95th-percentile Hausdorff distance (mm) via ``monai.metrics``.

    Classes absent from both prediction and truth get Dice NaN (not counted); HD95 is NaN when
    either side is empty.

    >>> dice_hd95(pred_labels, true_labels, num_classes=7, spacing=(3, 3, 3))["dice"]
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.nn.functional.one_hot(torch.as_tensor(np.asarray(pred, dtype=np.int64)), num_classes).permute(3, 0, 1, 2)[None]
    t = torch.nn.functional.one_hot(torch.as_tensor(np.asarray(truth, dtype=np.int64)), num_classes).permute(3, 0, 1, 2)[None]
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0].tolist()
    hd = []
    for c in range(1, num_classes):
        if p[0, c].any() and t[0, c].any():
            hd.append(float(compute_hausdorff_distance(p[:, c:c + 1], t[:, c:c + 1], percentile=95, spacing=list(spacing))[0, 0]))
        else:
            hd.append(float("nan"))
    return {"dice": [float(d) for d in dice], "hd95": hd}


def mean_ignoring_nan(values) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def heatmap_iou(heat: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the thresholded heatmap with the true mask."""
    p, t = heat >= threshold, truth.astype(bool)
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else float("nan")


def pointing_hit(peak: Sequence[int], truth: np.ndarray) -> float:
    """1.0 when the pointed voxel (a head's ``peak``) falls inside the true mask (the pointing game)."""
    return float(truth[tuple(int(v) for v in peak)] > 0)


def centre_point_hit(truth: np.ndarray) -> float:
    """The trivial pointing answer: the centre voxel of the volume."""
    c = tuple(s // 2 for s in truth.shape)
    return float(truth[c] > 0)


def box_metrics(pred_boxes: Sequence, truths: Sequence[np.ndarray]) -> float:
    """Mean IoU of predicted boxes against the boxes of the true masks."""
    return mean_ignoring_nan(box_iou(b, box_from_mask(t)) for b, t in zip(pred_boxes, truths))


def voxel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], within: Sequence[np.ndarray] | None = None,
                max_voxels: int = 400_000, seed: int = 0) -> float:
    """AUROC of anomaly maps against lesion masks over voxels (those in ``within``, e.g. the body,
    when given: air outside the body is not where anyone looks for a lesion), subsampled above
    ``max_voxels``."""
    keep_in = [np.ones(np.shape(m), bool) if within is None else np.asarray(w, bool) | (np.asarray(m) > 0)
               for m, w in zip(masks, within if within is not None else masks)]
    s = np.concatenate([np.asarray(m, dtype=np.float32)[k] for m, k in zip(maps, keep_in)])
    y = np.concatenate([np.asarray(m)[k] > 0 for m, k in zip(masks, keep_in)])
    if s.size > max_voxels:
        keep = np.random.default_rng(seed).choice(s.size, max_voxels, replace=False)
        keep = np.union1d(keep, np.flatnonzero(y))
        s, y = s[keep], y[keep]
    return roc_auc(s, y)
