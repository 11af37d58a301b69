"""Training a task head on the frozen (or partly unfrozen) encoder, for every task.

One loop serves all tasks: features of the training and validation views are computed once
(:func:`~decipher_mr.train.head_data.extract_features`), a :class:`TaskTargets` turns cache fields
into tensors on the same views, and each iteration draws a batch, computes the task loss and steps
AdamW on per-iteration schedules. Validation runs every ``eval_every`` iterations and goes, with the
elapsed wall-clock time, into ``history.json`` (learning curves, time-to-Dice comparisons).

Writes ``RUN/head/`` (the bundle-ready head: head.json, head.safetensors, labels.csv),
``RUN/checkpoints/`` (resumable), ``RUN/history.json``, ``RUN/tensorboard/`` and, with
``unfreeze_last > 0``, ``RUN/encoder.safetensors`` (the fine-tuned encoder the head expects).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.heads import build_head, config_for_task, save_head
from decipher_mr.heads.segmentation import default_layers
from decipher_mr.models.vit3d import EncoderOutput
from decipher_mr.storage import atomic_write_json

from .head_data import extract_features
from .head_targets import TaskTargets, task_loss

HEAD_DEFAULTS: dict[str, Any] = {
    "task": None,
    "cache": None,
    "output": None,
    "encoder": {"preset": "vit-micro"},  # preset (random init, seeded), {"export": dir} or {"aligned": dir}
    "text": None,  # grounding: text tower spec when the encoder is not an aligned model (default MiniLM)
    "head": {},  # head config overrides (labels, groups, layers, channels, crop, ...)
    "target": None,  # cache field the head learns (defaults per task)
    "where": {},  # item filter, e.g. {"body_region": "brain"}
    "train_split": "train",
    "val_split": "val",
    "fraction": 1.0,
    "unfreeze_last": 0,
    "encoder_lr_scale": 0.1,
    "iterations": 200,
    "batch_size": 2,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_iterations": 10,
    "weight_decay": 1e-4,
    "eval_every": 25,
    "checkpoint_every": 100,
    "keep_checkpoints": 2,
    "feature_store": True,
    "seed": 0,
    "device": None,
    "resume": True,
    "progress": True,
}

DEFAULT_TARGET = {"classify": "body_region", "regress": "lesion_volume_ml", "segment": "regions",
                  "anomaly": "lesion", "ground": "phrases", "localize": "regions"}


def load_encoder(spec: Any, seed: int = 0, weights: str | Path | None = None):
    """The vision encoder for a head run, and (for an aligned model) its text encoder function.

    A preset is built under ``torch.manual_seed(seed)`` so the same (spec, seed) rebuilds the same
    random encoder at evaluation time; ``weights`` (a fine-tuned encoder's safetensors) overrides.

    >>> encoder, encode_text = load_encoder({"preset": "vit-micro"}, seed=0)
    """
    from decipher_mr.models.clip import build_vision_from_spec
    from decipher_mr.train.ssl.export import teacher_backbone_from_run

    encode_text = None
    if isinstance(spec, dict) and spec.get("aligned"):
        from decipher_mr.models.clip import load_image_text_model

        model = load_image_text_model(spec["aligned"])
        model.eval()
        encoder = model.vision
        encode_text = lambda phrases: model.encode_reports(list(phrases))  # noqa: E731
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = build_vision_from_spec(spec, run_loader=teacher_backbone_from_run)
    if weights:
        from safetensors.torch import load_file

        encoder.load_state_dict(load_file(str(weights)), strict=True)
    return encoder.eval(), encode_text


def text_encoder_for(cfg: dict[str, Any], encode_text):
    """(encode function, source string) for grounding phrases."""
    if encode_text is not None:
        return encode_text, f"aligned:{cfg['encoder'].get('aligned')}"
    from decipher_mr.models.text import TextTower

    tower = TextTower.from_spec(cfg.get("text"))
    tower.eval()
    return (lambda phrases: tower.encode(list(phrases))), f"text:{cfg.get('text') or 'minilm'}"


def select_items(cache: PreparedCache, split: str | None, where: dict[str, Any]) -> list[int]:
    return [i for i in cache.indices(split=split) if all(
        (getattr(cache.items[i], k, None) if hasattr(cache.items[i], k) else cache.items[i].labels.get(k)) == v
        for k, v in where.items())]


def subsample(indices: list[int], fraction: float, seed: int) -> list[int]:
    """A deterministic ``fraction`` of ``indices`` (at least one item)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(indices)
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * len(indices))))
    return sorted(rng.choice(indices, size=n, replace=False).tolist())


def batch_output(feats, encoder=None, unfreeze_last: int = 0, layers=()) -> EncoderOutput:
    """An EncoderOutput for a list of cached items; with ``unfreeze_last`` the last blocks run now."""
    if unfreeze_last <= 0:
        return EncoderOutput(cls=torch.stack([f.cls for f in feats]), patch_tokens=torch.stack([f.tokens for f in feats]),
                             grid=feats[0].grid, layers={l: torch.stack([f.layers[l] for f in feats]) for l in feats[0].layers})
    depth = len(encoder.blocks)
    first = depth - unfreeze_last
    skip = 1 + encoder.config.num_registers
    h = torch.stack([f.hidden for f in feats])
    out_layers = {l: torch.stack([f.layers[l] for f in feats]) for l in layers if l <= first}
    for n, blk in enumerate(encoder.blocks[first:], start=first + 1):
        h = blk(h)
        if n in layers:
            out_layers[n] = h[:, skip:]
    h = encoder.norm(h)
    return EncoderOutput(cls=h[:, 0], patch_tokens=h[:, skip:], grid=feats[0].grid, layers=out_layers)


def _head_config(cfg: dict[str, Any], encoder, targets: TaskTargets) -> dict[str, Any]:
    task = cfg["task"]
    hc = {"embed_dim": encoder.config.embed_dim, "target": targets.target, **targets.config_fields(), **cfg["head"]}
    if task in ("segment", "anomaly"):
        hc.setdefault("layers", default_layers(len(encoder.blocks)))
    return hc


def train_head(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one head from a merged config (see :data:`HEAD_DEFAULTS`); returns a summary.

    >>> train_head({**HEAD_DEFAULTS, "task": "classify", "cache": "demo/cache", "output": "runs/heads/cls"})
    """
    from decipher_mr.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from decipher_mr.train.monitor import TrainingMonitor
    from decipher_mr.train.schedules import apply_to_optimizer, cosine_schedule

    task = cfg["task"]
    if not cfg.get("cache"):
        raise ValueError("train-head needs a prepared cache: set cache=DIR")
    if not cfg.get("output"):
        raise ValueError("train-head needs an output folder: set output=DIR")
    t_start = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = Path(cfg["output"])
    run.mkdir(parents=True, exist_ok=True)
    cache = PreparedCache(cfg["cache"])
    encoder, encode_text = load_encoder(cfg["encoder"], cfg["seed"])
    encoder.to(device)
    say = (lambda m: print(m, flush=True)) if cfg["progress"] else (lambda m: None)

    train_idx = subsample(select_items(cache, cfg["train_split"], cfg["where"]), cfg["fraction"], cfg["seed"])
    val_idx = select_items(cache, cfg["val_split"], cfg["where"])
    if not train_idx:
        raise ValueError(f"{cache.root}: no items in split {cfg['train_split']!r} matching {cfg['where']}")
    targets = TaskTargets.build(task, cfg, cache, train_idx, val_idx)
    unsupervised = task == "anomaly" and cfg["head"].get("mode", "supervised") == "unsupervised"
    layers: tuple[int, ...] = ()
    if task in ("segment", "anomaly") and not unsupervised:
        layers = tuple(sorted(set(cfg["head"].get("layers") or default_layers(len(encoder.blocks)))))
    crop = targets.crop
    k = int(cfg["unfreeze_last"])
    if not 0 <= k <= len(encoder.blocks):
        raise ValueError(f"--unfreeze-last must be in 0..{len(encoder.blocks)}, got {k}")
    store = run.parent / ".features" if cfg["feature_store"] else None
    say(f"train-head {task}: {len(train_idx)} training and {len(val_idx)} validation items, view {crop}, "
        f"encoder {'frozen' if k == 0 else f'last {k} blocks trainable'}")
    t_feat = time.perf_counter()
    train_feats = extract_features(encoder, cache, train_idx, crop, layers, k, device, store, cfg["progress"])
    val_feats = extract_features(encoder, cache, val_idx, crop, layers, k, device, store, cfg["progress"])
    targets.attach(train_feats, val_feats)
    text_source = ""
    if task == "ground":
        encode, text_source = text_encoder_for(cfg, encode_text)
        with torch.no_grad():
            targets.set_text(encode(targets.phrases).float().cpu())
    feature_s = time.perf_counter() - t_feat
    extra_cfg = {"text_dim": targets.text.shape[1], "text_source": text_source} if task == "ground" else {}
    head_cfg = config_for_task(task, {**_head_config(cfg, encoder, targets), **extra_cfg})
    head = build_head(task, head_cfg).to(device)

    if unsupervised:
        head.fit(*targets.normal_tokens(train_feats, head_cfg),  # type: ignore[operator]
                 context=[cache.items[f.index] for f in train_feats])
        history = [{"iteration": 0, "elapsed_s": time.perf_counter() - t_start, "loss": None,
                    "val": targets.validate(head, val_feats, batch_output)}]
        return _finish(run, cfg, head, history, encoder, k, feature_s, t_start, say)

    params = [{"params": [p for p in head.parameters() if p.requires_grad], "lr_scale": 1.0, "wd_scale": 1.0}]
    tail = torch.nn.ModuleList(list(encoder.blocks[len(encoder.blocks) - k:]) + [encoder.norm]) if k else None
    if tail is not None:
        encoder.requires_grad_(False)
        tail.requires_grad_(True)
        params.append({"params": list(tail.parameters()), "lr_scale": cfg["encoder_lr_scale"], "wd_scale": 1.0})
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    iters = int(cfg["iterations"])
    lr = cosine_schedule(cfg["lr"], cfg["min_lr"], iters, cfg["warmup_iterations"])
    modules = {"head": head, **({"tail": tail} if tail is not None else {})}
    arch = {"task": task, "head": head_cfg.to_dict(), "encoder": encoder.config.to_dict(), "unfreeze_last": k}
    ckpt_root = run / "checkpoints"
    start, history, elapsed_before = 0, [], 0.0
    latest = latest_checkpoint(ckpt_root) if cfg["resume"] else None
    if latest is not None:
        state = load_checkpoint(latest, modules, {"adamw": opt}, architecture=arch)
        start, history, elapsed_before = state["iteration"], state.get("history", []), state.get("elapsed_s", 0.0)
        say(f"resuming from {latest} (iteration {start})")
    rng = np.random.default_rng(cfg["seed"] + start)
    monitor = TrainingMonitor(run, total=iters, start=start, enabled=cfg["progress"], desc=f"train-head {task}")
    t_loop = time.perf_counter() - elapsed_before
    # The head's clock includes computing frozen features, so time-to-Dice comparisons are fair.
    clock = lambda: feature_s + time.perf_counter() - t_loop  # noqa: E731
    try:
        for it in range(start, iters):
            head.train()
            if tail is not None:
                tail.train()
            apply_to_optimizer(opt, float(lr[it]), cfg["weight_decay"])
            pick = rng.choice(len(train_feats), size=min(cfg["batch_size"], len(train_feats)), replace=False)
            batch = [train_feats[j] for j in pick]
            out = batch_output(batch, encoder, k, layers)
            loss = task_loss(task, head, out, batch, targets, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics = {"loss": float(loss.detach()), "lr": float(lr[it])}
            last = it + 1 == iters
            if (it + 1) % cfg["eval_every"] == 0 or last:
                head.eval()
                with torch.no_grad():
                    val = targets.validate(head, val_feats, lambda f: batch_output(f, encoder, k, layers))
                history.append({"iteration": it + 1, "elapsed_s": clock(), "loss": float(loss.detach()), "val": val})
                metrics.update({f"val/{n}": v for n, v in val.items() if isinstance(v, (int, float))})
            monitor.step(it + 1, metrics, samples=len(batch))
            # The last iteration is checkpointed too, so re-running a finished run is a no-op.
            if (it + 1) % cfg["checkpoint_every"] == 0 or last:
                save_checkpoint(ckpt_root, it + 1, modules, {"adamw": opt},
                                {"history": history, "elapsed_s": clock() - feature_s}, arch, keep=cfg["keep_checkpoints"])
    finally:
        monitor.close()
    return _finish(run, cfg, head, history, encoder, k, feature_s, t_start, say)


def _finish(run: Path, cfg, head, history, encoder, k, feature_s, t_start, say) -> dict[str, Any]:
    from safetensors.torch import save_file

    from decipher_mr.storage import atomic_path

    extra = {"encoder": {"spec": cfg["encoder"], "seed": cfg["seed"], "config": encoder.config.to_dict()},
             "training": {"cache": str(cfg["cache"]), "fraction": cfg["fraction"], "where": cfg["where"],
                          "unfreeze_last": k, "iterations": cfg["iterations"]}}
    if k:
        with atomic_path(run / "encoder.safetensors", suffix=".safetensors") as tmp:
            save_file({n: v.detach().cpu().contiguous().clone() for n, v in encoder.state_dict().items()}, str(tmp))
        extra["encoder"]["weights"] = "encoder.safetensors"
    save_head(head.cpu(), run / "head", extra=extra)
    summary = {"task": cfg["task"], "output": str(run), "feature_seconds": feature_s,
               "total_seconds": time.perf_counter() - t_start, "final": history[-1]["val"] if history else {},
               "fraction": cfg["fraction"], "history": history}
    atomic_write_json(run / "history.json", summary)
    say(f"head saved to {run / 'head'}; validation: {json.dumps(summary['final'])}")
    return summary
