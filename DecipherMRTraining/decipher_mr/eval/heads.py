"""Evaluating trained heads on held-out items, each next to the trivial baseline it must beat.

Baselines: majority class (classify), training mean (regress), empty mask (segment, Dice 0), a
constant map (anomaly, AUROC 0.5), the centre point (ground, localize pointing) and the whole view
as a box (localize IoU). Segmentation is predicted on the whole prepared array with sliding windows
of the training crop, so volumes larger than the crop are handled as at inference time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.heads import load_head
from decipher_mr.heads.dense import predict_volume

from . import head_metrics as M


def _targets_for(record: dict[str, Any], cache: PreparedCache, indices: list[int]):
    from decipher_mr.train.head_targets import TaskTargets

    hc = record["config"]
    head_cfg = {"crop": hc.get("crop", [64, 64, 64]), "labels": hc.get("labels")}
    if hc.get("groups"):
        head_cfg["groups"] = hc["groups"]
    target = hc.get("target") or None
    if record["task"] == "regress" and target and "," in target:
        target = target.split(",")
    return TaskTargets.build(record["task"], {"target": target, "head": head_cfg}, cache, [], indices)


def load_run(run: str | Path):
    """(head, head.json record, encoder, text encode function or None) of a train-head run folder.

    >>> head, record, encoder, encode_text = load_run("runs/heads/segment")
    """
    from decipher_mr.train.heads import load_encoder

    run = Path(run)
    head, record = load_head(run / "head" if (run / "head").is_dir() else run)
    enc = record.get("encoder", {})
    weights = run / enc["weights"] if enc.get("weights") else None
    encoder, encode_text = load_encoder(enc.get("spec", {"preset": "vit-micro"}), enc.get("seed", 0), weights)
    return head, record, encoder, encode_text


@torch.no_grad()
def evaluate_head(run: str | Path, cache: PreparedCache, splits: Sequence[str] = ("test",),
                  progress: bool = False) -> dict[str, Any]:
    """Metrics of a trained head on ``splits`` of ``cache`` with the task's trivial baseline.

    The item filter (``where``) the head was trained with applies here too.

    >>> res = evaluate_head("runs/heads/segment", PreparedCache("demo/cache"), ("val", "test"))
    >>> res["metrics"]["dice"], res["baseline"]["dice"]
    """
    from decipher_mr.train.head_data import extract_features
    from decipher_mr.train.heads import batch_output, select_items, text_encoder_for

    head, record, encoder, encode_text = load_run(run)
    task = record["task"]
    where = record.get("training", {}).get("where", {}) or {}
    indices = [i for s in splits for i in select_items(cache, s, where)]
    if not indices:
        raise ValueError(f"{cache.root}: no items in splits {list(splits)} matching {where}")
    targets = _targets_for(record, cache, indices)
    crop = list(record["config"].get("crop", [64, 64, 64]))
    layers = tuple(getattr(head, "required_layers", ()))
    feats = extract_features(encoder, cache, indices, crop, layers, progress=progress)
    targets.attach(feats, [])
    if task == "ground":
        src = record["config"].get("text_source", "")
        encode, _ = text_encoder_for({"encoder": {"aligned": src[len("aligned:"):]} if src.startswith("aligned:") else {},
                                      "text": None if src in ("", "text:minilm") else src[len("text:"):]}, encode_text)
        targets.set_text(encode(targets.phrases).float().cpu())
    result: dict[str, Any] = {"task": task, "run": str(run), "splits": list(splits), "n": len(indices),
                              "labels": list(record["config"].get("labels", [])), "examples": []}
    if task in ("classify", "regress"):
        keep = [f for f in feats if f.index in targets.values]
        pred = head(batch_output(keep))
        truth = [targets.values[f.index] for f in keep]
        if task == "classify":
            result["metrics"] = M.classification_metrics(pred, truth, targets.labels)
            majority = _training_majority(record, cache, targets)
            result["baseline"] = {"accuracy": float(np.mean(np.asarray(truth) == majority)), "name": "majority class"}
        else:
            result["metrics"] = M.regression_metrics(pred, torch.tensor(truth))
            mean = torch.tensor(record["config"].get("target_mean") or [0.0])
            result["baseline"] = {"mae": float((torch.tensor(truth) - mean).abs().mean()), "name": "training mean"}
        return result
    if task == "segment":
        dice, hd = [], []
        for f in feats:
            array = np.asarray(cache.load(f.index), dtype=np.float32)
            truth = targets._label_view(f.index, full=True)
            pred = predict_volume(encoder, head, array, crop).argmax(0).numpy()
            m = M.dice_hd95(pred, truth, len(targets.labels), cache.items[f.index].spacing)
            dice.append(m["dice"])
            hd.append(m["hd95"])
            if len(result["examples"]) < 2:
                result["examples"].append({"id": cache.items[f.index].id, "image": array, "truth": truth, "pred": pred})
        per_class = np.nanmean(np.array(dice, dtype=np.float64), axis=0) if dice else []
        result["metrics"] = {"dice": M.mean_ignoring_nan(per_class), "hd95_mm": M.mean_ignoring_nan(np.ravel(hd)),
                             "dice_per_class": dict(zip(targets.labels[1:], [float(v) for v in per_class]))}
        result["baseline"] = {"dice": 0.0, "name": "empty mask"}
        return result
    if task == "anomaly":
        maps, masks, body = [], [], []
        for f in feats:
            amap = head.anomaly_map(batch_output([f]), f.image[None], context=[cache.items[f.index]])[0, 0].numpy()
            maps.append(amap)
            masks.append(targets.dense[f.index])
            body.append(f.image[0].numpy() > 0.05)
            if len(result["examples"]) < 2 and masks[-1].any():
                result["examples"].append({"id": cache.items[f.index].id, "image": f.image[0].numpy(), "truth": masks[-1], "heat": amap})
        dice = [M.dice_hd95((a >= 0.5).astype(np.int64), m, 2)["dice"][0] for a, m in zip(maps, masks) if m.any()]
        result["metrics"] = {"voxel_auroc": M.voxel_auroc(maps, masks, body), "dice": M.mean_ignoring_nan(dice),
                             "in_range": bool(all(0 <= a.min() and a.max() <= 1 for a in maps))}
        result["baseline"] = {"voxel_auroc": 0.5, "dice": 0.0, "name": "constant map"}
        return result
    ious, hits, centre_hits, view_ious = [], [], [], []
    for f in feats:
        out = batch_output([f])
        image = f.image[None]
        if task == "localize":
            found = head.locate(out, image)[0]
            pairs = [(found[n]["heatmap"], found[n]["peak"], found[n]["box"], m)
                     for n, m in zip(targets.labels, targets.structure_masks(f.index)) if m.any()]
        else:
            pairs = []
            for pi, m in targets.pairs.get(f.index, []):
                r = head.ground(out, image, targets.text[pi:pi + 1])[0]
                pairs.append((r["heatmap"], r["peak"], r["box"], m))
        for heat, peak, box, m in pairs:
            ious.append(M.box_metrics([box], [m]) if task == "localize" else M.heatmap_iou(heat, m, head.config.threshold))
            hits.append(M.pointing_hit(peak, m))
            centre_hits.append(M.centre_point_hit(m))
            view_ious.append(M.box_metrics([[0, 0, 0, *m.shape]], [m]))
            if len(result["examples"]) < 2:
                result["examples"].append({"id": cache.items[f.index].id, "image": f.image[0].numpy(), "truth": m, "heat": heat})
    key = "box_iou" if task == "localize" else "heatmap_miou"
    result["metrics"] = {key: M.mean_ignoring_nan(ious), "pointing": M.mean_ignoring_nan(hits), "pairs": len(hits)}
    result["baseline"] = {"pointing": M.mean_ignoring_nan(centre_hits),
                          "name": "centre point" if task == "ground" else "centre point; whole view as box"}
    if task == "localize":
        result["baseline"]["box_iou"] = M.mean_ignoring_nan(view_ious)
    return result


def _training_majority(record: dict[str, Any], cache: PreparedCache, targets) -> int:
    from decipher_mr.train.head_data import item_value
    from decipher_mr.train.heads import select_items

    training = record.get("training", {})
    idx = select_items(cache, "train", training.get("where", {}) or {})
    values = [item_value(cache.items[i], targets.target) for i in idx]
    codes = [targets.labels.index(str(v)) for v in values if v is not None and str(v) in targets.labels]
    return int(np.bincount(codes).argmax()) if codes else 0


def compare_with_segresnet(run: str | Path, cache: PreparedCache, budget_s: float | None = None) -> dict[str, Any]:
    """Train SegResNet from scratch on the head's training split and views for the head's wall-clock
    budget; report both Dice values and the time each needs to reach SegResNet's final Dice.

    >>> cmp = compare_with_segresnet("runs/heads/segment", PreparedCache("demo/cache"))
    """
    import json

    from decipher_mr.train.heads import select_items

    from .segresnet_baseline import time_to_reach, train_segresnet_baseline

    run = Path(run)
    hist = json.loads((run / "history.json").read_text(encoding="utf-8"))
    head, record, _, _ = load_run(run)
    if record["task"] != "segment":
        raise ValueError(f"{run}: the SegResNet comparison is for segmentation heads, not {record['task']!r}")
    training = record.get("training", {})
    where = training.get("where", {}) or {}
    from decipher_mr.train.heads import subsample

    train_idx = subsample(select_items(cache, "train", where), float(training.get("fraction", 1.0)), 0)
    val_idx = select_items(cache, "val", where)
    targets = _targets_for(record, cache, train_idx + val_idx)
    budget = float(budget_s if budget_s is not None else hist["total_seconds"])
    base = train_segresnet_baseline(cache, train_idx, val_idx, targets, record["config"]["crop"], budget)
    head_curve = [{"elapsed_s": h["elapsed_s"], "dice": h["val"].get("dice")} for h in hist["history"]]
    level = base["final_dice"]
    return {"run": str(run), "baseline": base, "head_final_dice": head_curve[-1]["dice"] if head_curve else float("nan"),
            "head_seconds": head_curve[-1]["elapsed_s"] if head_curve else float("nan"),
            "head_time_to_baseline": time_to_reach(head_curve, "dice", level),
            "baseline_time_to_baseline": time_to_reach(base["history"], "dice", level)}
