"""Per-task targets on the training views, the task losses and the validation metrics.

:class:`TaskTargets` reads what a head learns from the cache (class names, regression values, label
maps, lesion masks, phrase/region pairs) for the same centred views the features were computed on,
so a target voxel and a feature token always refer to the same place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import PreparedCache
from decipher_mr.eval import head_metrics as M
from decipher_mr.heads.dense import centre_view, occupancy

from .head_data import AAL_LOBES, grounding_pairs, grouped_labels, item_value, load_regions, region_names


@dataclass
class TaskTargets:
    task: str
    target: str
    cache: PreparedCache
    labels: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)  # item index -> class index / value vector
    dense: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> view-space target
    pairs: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)  # ground: (phrase idx, mask)
    phrases: list[str] = field(default_factory=list)
    text: torch.Tensor | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    crop: list[int] = field(default_factory=lambda: [64, 64, 64])

    @classmethod
    def build(cls, task: str, cfg: dict[str, Any], cache: PreparedCache, train_idx, val_idx) -> "TaskTargets":
        """Targets of every train/val item for ``task`` (see the module docstring)."""
        from .heads import DEFAULT_TARGET

        target = cfg.get("target") or DEFAULT_TARGET[task]
        head = cfg.get("head", {})
        t = cls(task, target if isinstance(target, str) else ",".join(target), cache, crop=list(head.get("crop", [64, 64, 64])))
        everything = list(train_idx) + list(val_idx)
        if task == "classify":
            seen = {item_value(cache.items[i], target) for i in everything} - {None}
            t.labels = list(head.get("labels") or sorted(str(v) for v in seen))
            for i in everything:
                v = item_value(cache.items[i], target)
                if v is not None and str(v) in t.labels:
                    t.values[i] = t.labels.index(str(v))
        elif task == "regress":
            keys = [target] if isinstance(target, str) else list(target)
            t.labels = keys
            for i in everything:
                vals = [item_value(cache.items[i], k) for k in keys]
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                    t.values[i] = [float(v) for v in vals]
            train_vals = np.array([t.values[i] for i in train_idx if i in t.values], dtype=np.float64)
            if len(train_idx) and not len(train_vals):
                raise ValueError(f"{cache.root}: no training item has a numeric {target!r}")
            if len(train_vals):
                t.mean = train_vals.mean(0).tolist()
                t.std = np.maximum(train_vals.std(0), 1e-3).tolist()
        elif task in ("segment", "localize"):
            if target == "lesion":
                t.labels = ["background", "lesion"] if task == "segment" else ["lesion"]
            else:
                t.groups = dict(head.get("groups") or AAL_LOBES)
                t.labels = (["background"] if task == "segment" else []) + list(t.groups)
        elif task == "anomaly":
            t.labels = ["anomaly"]
        elif task == "ground":
            t.labels = []
        missing = [cache.items[i].id for i in train_idx if task in ("classify", "regress") and i not in t.values]
        if missing:
            raise ValueError(f"{cache.root}: training items without a usable {target!r}: {missing[:5]}")
        return t

    def config_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": self.labels, "crop": list(self.crop)}
        if self.task == "regress":
            out.update(target_mean=self.mean, target_std=self.std)
        if self.groups:
            out["groups"] = self.groups
        return out

    def set_text(self, embeddings: torch.Tensor) -> None:
        self.text = embeddings

    # --- dense targets on the views ---------------------------------------------------------
    def _label_view(self, i: int, full: bool = False) -> np.ndarray:
        """The item's target labels on its training view (or, with ``full``, on the whole array)."""
        fit = (lambda a: a) if full else (lambda a: centre_view(a, self.crop)[0])
        if self.target == "lesion" or self.task == "anomaly":
            mask = self.cache.load_mask(i)
            if mask is None:
                return fit(np.zeros(self.cache.items[i].shape, dtype=np.uint8))
            return fit((np.asarray(mask) > 0).astype(np.uint8))
        regions = load_regions(self.cache, i)
        if regions is None:
            raise ValueError(f"{self.cache.root}: item {self.cache.items[i].id} has no regions label map")
        return fit(grouped_labels(regions, region_names(self.cache, self.cache.items[i]), self.groups))

    def attach(self, train_feats, val_feats) -> None:
        """Compute the view-space targets of every featurised item."""
        for f in [*train_feats, *val_feats]:
            if self.task in ("segment", "anomaly", "localize"):
                self.dense[f.index] = self._label_view(f.index)
            elif self.task == "ground":
                pairs = []
                for phrase, mask in grounding_pairs(self.cache, f.index, self.crop):
                    if phrase not in self.phrases:
                        self.phrases.append(phrase)
                    pairs.append((self.phrases.index(phrase), mask))
                self.pairs[f.index] = pairs
        if self.task == "ground" and not any(self.pairs.get(f.index) for f in train_feats):
            raise ValueError(f"{self.cache.root}: no (phrase, region) pairs in the training items")

    def structure_masks(self, i: int) -> np.ndarray:
        """(K, X, Y, Z) boolean masks of the localization structures on item ``i``'s view."""
        lab = self.dense[i]
        if self.target == "lesion":
            return (lab > 0)[None]
        return np.stack([lab == k for k in range(1, len(self.labels) + 1)])

    def normal_tokens(self, feats, cfg) -> tuple[list, list, list]:
        """Tokens, grids and per-token 'wholly normal' flags for fitting the normal-token model
        (each study's metadata, for its group statistics, is ``[cache.items[f.index] for f in feats]``)."""
        tokens, grids, valid = [], [], []
        for f in feats:
            lesion = torch.from_numpy(self.dense[f.index].astype(np.float32))[None, None]
            occ = occupancy(lesion, 8)[0, 0].flatten()
            tokens.append(f.tokens[None])
            grids.append(f.grid)
            valid.append((occ == 0)[None])
        return tokens, grids, valid

    # --- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, head, feats, output_fn: Callable) -> dict[str, float]:
        """Task metrics on ``feats`` (``primary`` is the one learning curves plot)."""
        if not feats:
            return {}
        task = self.task
        if task in ("classify", "regress"):
            keep = [f for f in feats if f.index in self.values]
            if not keep:
                return {}
            pred = head(output_fn(keep))
            if task == "classify":
                m = M.classification_metrics(pred, [self.values[f.index] for f in keep], self.labels)
                return {**m, "primary": m["accuracy"]}
            m = M.regression_metrics(pred, torch.tensor([self.values[f.index] for f in keep]))
            return {**m, "primary": -m["mae"]}
        dice, auc_maps, auc_masks, auc_body, ious, hits = [], [], [], [], [], []
        for f in feats:
            out = output_fn([f])
            image = f.image[None]
            truth = self.dense.get(f.index)
            if task == "segment":
                pred = head(out, image=image)[0].argmax(0).numpy()
                dice.append(M.mean_ignoring_nan(M.dice_hd95(pred, truth, len(self.labels))["dice"]) if truth.any() else np.nan)
            elif task == "anomaly":
                amap = head.anomaly_map(out, image, context=[self.cache.items[f.index]])[0, 0].numpy()
                if truth.any():
                    dice.append(M.dice_hd95((amap >= 0.5).astype(np.int64), truth, 2)["dice"][0])
                auc_maps.append(amap)
                auc_masks.append(truth)
                auc_body.append(f.image[0].numpy() > 0.05)
            elif task == "localize":
                masks = self.structure_masks(f.index)
                found = head.locate(out, image)[0]
                for name, m in zip(self.labels, masks):
                    if m.any():
                        ious.append(M.box_metrics([found[name]["box"]], [m]))
                        hits.append(M.pointing_hit(found[name]["peak"], m))
            elif task == "ground":
                for pi, m in self.pairs.get(f.index, []):
                    res = head.ground(out, image, self.text[pi:pi + 1])[0]
                    ious.append(M.heatmap_iou(res["heatmap"], m, head.config.threshold))
                    hits.append(M.pointing_hit(res["peak"], m))
        if task == "segment":
            d = M.mean_ignoring_nan(dice)
            return {"dice": d, "primary": d}
        if task == "anomaly":
            d = M.mean_ignoring_nan(dice)
            auc = M.voxel_auroc(auc_maps, auc_masks, auc_body) if any(m.any() for m in auc_masks) else float("nan")
            return {"dice": d, "voxel_auroc": auc, "primary": auc}
        if task == "localize":
            return {"box_iou": M.mean_ignoring_nan(ious), "pointing": M.mean_ignoring_nan(hits), "primary": M.mean_ignoring_nan(ious)}
        return {"heatmap_miou": M.mean_ignoring_nan(ious), "pointing": M.mean_ignoring_nan(hits), "primary": M.mean_ignoring_nan(hits)}


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, max_weight: float = 50.0) -> torch.Tensor:
    """BCE with positives up-weighted to balance small structures against the background."""
    pos = max(float(target.mean()), 1e-4)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(min(0.5 / pos, max_weight)))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def task_loss(task: str, head, out, batch, targets: TaskTargets, rng: np.random.Generator) -> torch.Tensor:
    """The training loss of one batch for ``task``.

    >>> loss = task_loss("segment", head, batch_output(batch), batch, targets, rng)
    """
    if task == "classify":
        return F.cross_entropy(head.raw(out), torch.tensor([targets.values[f.index] for f in batch]))
    if task == "regress":
        y = torch.tensor([targets.values[f.index] for f in batch], dtype=torch.float32)
        return F.mse_loss(head.raw(out), head.normalise_targets(y))
    images = torch.stack([f.image for f in batch])
    if task == "segment":
        truth = torch.from_numpy(np.stack([targets.dense[f.index] for f in batch]).astype(np.int64))
        logits = head(out, image=images)
        onehot = F.one_hot(truth, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
        probs = logits.softmax(1)
        inter = (probs * onehot).sum((2, 3, 4))
        dice = 1 - (2 * inter + 1) / (probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4)) + 1)
        return F.cross_entropy(logits, truth) + dice[:, 1:].mean()
    if task == "anomaly":
        truth = torch.from_numpy(np.stack([targets.dense[f.index] for f in batch]).astype(np.float32))[:, None]
        logits = head(out, image=images)
        # Lesions fill well under 1 % of a view: weight positives so the head does not settle on "all normal".
        pos = max(float(truth.mean()), 1e-4)
        bce = F.binary_cross_entropy_with_logits(logits, truth, pos_weight=torch.tensor(min(0.5 / pos, 50.0)))
        return bce + soft_dice_loss(logits, truth)
    if task == "localize":
        masks = torch.from_numpy(np.stack([targets.structure_masks(f.index) for f in batch]).astype(np.float32))
        occ = occupancy(masks, 8)
        logits = head.token_logits(out)
        return balanced_bce(logits, occ) + soft_dice_loss(logits, occ)
    if task == "ground":
        texts, occs = [], []
        for f in batch:
            pairs = targets.pairs.get(f.index) or []
            if not pairs:
                texts.append(torch.zeros(targets.text.shape[1]))
                occs.append(torch.zeros(1, *f.grid))
                continue
            pi, m = pairs[int(rng.integers(len(pairs)))]
            texts.append(targets.text[pi])
            occs.append(occupancy(torch.from_numpy(m.astype(np.float32))[None, None], 8)[0])
        logits = head.token_logits(out, torch.stack(texts))
        occ = torch.stack(occs)
        return balanced_bce(logits, occ) + soft_dice_loss(logits, occ)
    raise ValueError(f"unknown head task {task!r}")
