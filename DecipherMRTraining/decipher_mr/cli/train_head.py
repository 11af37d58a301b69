"""Train a light task head on the frozen encoder (or with its last K blocks unfrozen).

Tasks: classify (e.g. body region), regress (e.g. lesion volume), segment (merged atlas regions
or lesion masks, UNETR-style decoder), anomaly (supervised from lesion masks, or head.mode=
"unsupervised": a model of normal patch tokens), ground (phrase -> heatmap, mask and box) and
localize (boxes of named structures). Frozen features are computed once and kept next to the run,
so training takes seconds to minutes on a CPU. Writes OUTPUT/head/ (head.json, head.safetensors,
labels.csv: what a model bundle stores), OUTPUT/history.json (learning curve), checkpoints and
TensorBoard logs; re-running resumes.

examples:
  decipher-mr train-head --task segment --config configs/heads-segment.json cache=demo/cache output=runs/heads/segment
  decipher-mr train-head --task classify --config configs/heads-classify.json cache=demo/cache --fraction 0.25
  decipher-mr train-head --task anomaly --config configs/heads-anomaly.json head.mode=unsupervised
"""

from __future__ import annotations

import argparse
import sys

TASKS = ("classify", "regress", "segment", "anomaly", "ground", "localize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS, help="which head to train")
    parser.add_argument("--config", help="JSON config (see DecipherMRTraining/configs/heads-*.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. iterations=100 head.channels=8 'where={\"body_region\":\"brain\"}'")
    parser.add_argument("--fraction", type=float, help="train on this fraction of the training items (low-data curve)")
    parser.add_argument("--unfreeze-last", type=int, metavar="K", help="also fine-tune the encoder's last K blocks")


def run(args: argparse.Namespace) -> int:
    from decipher_mr.train.checkpoint import CheckpointError
    from decipher_mr.train.heads import HEAD_DEFAULTS, train_head
    from decipher_mr.train.run_config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, HEAD_DEFAULTS, args.overrides)
        if cfg.get("task") not in (None, args.task):
            raise ConfigError(f"{args.config}: config is for task {cfg['task']!r}, not --task {args.task}")
        cfg["task"] = args.task
        if args.fraction is not None:
            cfg["fraction"] = args.fraction
        if args.unfreeze_last is not None:
            cfg["unfreeze_last"] = args.unfreeze_last
        if not cfg.get("output"):
            suffix = f"-f{cfg['fraction']:g}" if cfg["fraction"] != 1 else ""
            cfg["output"] = f"runs/heads/{args.task}{suffix}"
        train_head(cfg)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"train-head: error: {exc}", file=sys.stderr)
        return 2
    return 0
