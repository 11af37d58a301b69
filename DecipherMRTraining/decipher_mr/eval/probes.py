"""Frozen-feature probes: does pretraining help? k-NN and linear probes on the features of several encoders.

For each encoder (a bundle's :class:`Session`: the stage-1 encoder, the aligned encoder, and the stage-1
architecture with random weights) the features are ``Session.image_features`` of every volume (the
same image view for all encoders), probes are fitted on the ``train`` split and scored on the
evaluation split: body region, sequence and lesion presence. Balanced accuracy with a 95% bootstrap
interval by study, and chance 1/C. The random encoder is the baseline that pretraining must beat.

>>> table = probe_table({"stage 1": s1, "aligned": s2, "random init": rnd}, "demo/data/manifest.jsonl")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from decipher_mr.data.manifest import read_manifest
from decipher_mr.eval.stats import TABLE_HEAD, estimate, table_row

TASKS: dict[str, Callable[[Any], str | None]] = {
    "body region": lambda r: r.body_region,
    "sequence": lambda r: r.sequence,
    "lesion present": lambda r: None if r.labels.get("lesion_present") is None else str(int(bool(r.labels["lesion_present"]))),
}


def random_init_session(session, seed: int = 0):
    """``session`` with its vision encoder replaced by the same architecture at a seeded random init."""
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(seed)
    session.vision = build_vision_encoder(session.vision.config.to_dict()).to(session.device).eval()
    session.model = None  # no aligned projection belongs to these weights
    session.cache.clear()
    return session


def features(session, rows: Sequence[Any], view: dict[str, Any] | None, desc: str, progress: bool) -> np.ndarray:
    out = []
    for row in tqdm(rows, desc=desc, unit="volume", disable=not progress, leave=False):
        out.append(session.image_features(row.image, view=view).numpy())
    return np.stack(out).astype(np.float64)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def knn_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray, k: int = 5) -> np.ndarray:
    """Cosine k-NN majority vote (ties: the nearest neighbour's class among the tied)."""
    a = train / (np.linalg.norm(train, axis=1, keepdims=True) + 1e-12)
    b = test / (np.linalg.norm(test, axis=1, keepdims=True) + 1e-12)
    sim = b @ a.T
    order = np.argsort(-sim, axis=1)[:, : min(k, len(y))]
    pred = []
    for row in order:
        votes = {}
        for rank, j in enumerate(row):
            votes.setdefault(y[j], [0, rank])[0] += 1
        pred.append(max(votes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0])
    return np.array(pred)


def linear_predict(train: np.ndarray, y: np.ndarray, test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Multinomial logistic regression (L2, C=1) on standardised features."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y.tolist())) < 2:
        return np.full(len(test), y[0])
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(train, y)
    return clf.predict(test)


def _balanced(pred: np.ndarray, true: np.ndarray) -> float:
    recalls = [float((pred[true == c] == c).mean()) for c in np.unique(true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def probe_table(sessions: dict[str, Any], manifest: str, split: str = "test", train_split: str = "train",
                view: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Probe results for every encoder × task × probe (see the module)."""
    rows = [r for r in read_manifest(manifest, strict=False)[0]]
    train = [r for r in rows if (r.split or "train") == train_split]
    test = [r for r in rows if (r.split or "train") == split]
    if not train or not test:
        raise ValueError(f"{manifest}: needs items in splits {train_split!r} and {split!r}")
    groups = [r.study_id or r.id for r in test]
    result: dict[str, Any] = {"split": split, "train_split": train_split, "n_train": len(train), "n_test": len(test),
                              "view": view, "figures": {}}
    for name, session in sessions.items():
        f_train = features(session, train, view, f"features {name} (train)", progress)
        f_test = features(session, test, view, f"features {name} ({split})", progress)
        f_train, f_test = _standardise(f_train, f_test)
        for task, get in TASKS.items():
            y_tr = np.array([get(r) for r in train], dtype=object)
            y_te = np.array([get(r) for r in test], dtype=object)
            ok_tr, ok_te = y_tr != None, y_te != None  # noqa: E711 (element-wise)
            classes = sorted(set(y_tr[ok_tr].tolist()) | set(y_te[ok_te].tolist()))
            if len(classes) < 2 or ok_te.sum() < 2:
                continue
            true = y_te[ok_te]
            g = [groups[i] for i in np.flatnonzero(ok_te)]
            for probe, fn in (("k-NN", knn_predict), ("linear", linear_predict)):
                pred = fn(f_train[ok_tr], y_tr[ok_tr], f_test[ok_te])
                e = estimate(lambda idx, p=pred, t=true: _balanced(p[idx], t[idx]), g, chance=1.0 / len(classes))
                result["figures"][f"{task} · {probe} · {name}"] = {**e, "encoder": name, "task": task, "probe": probe,
                                                                  "classes": classes}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Frozen-feature probes (balanced accuracy)", "",
             f"Fitted on split `{result['train_split']}` ({result['n_train']} volumes), scored on `{result['split']}` "
             f"({result['n_test']} volumes); features: `Session.image_features` (cls ⊕ mean patch token of the image "
             f"view {result.get('view')}). Intervals: 95% bootstrap by study.", "", *TABLE_HEAD]
    lines += [table_row(name, e) for name, e in result["figures"].items()]
    return "\n".join(lines + [""])
