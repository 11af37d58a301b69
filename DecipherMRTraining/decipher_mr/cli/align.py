"""Stage 2: CLIP alignment of images and reports in a shared 512-d space.

Trains the image tower (a stage-1 export, or a preset with random init for tests) and the text
tower (any local BERT-family folder, default MiniLM) with the symmetric CLIP loss and a learnable
temperature, on organ-homogeneous batches of the prepared cache's train split. Towers can be
frozen or partially unfrozen (vision_trainable / text_trainable = "all", "frozen" or K last
blocks); chunks=K splits each batch GradCache-style so large batches fit in memory. Re-running
resumes from OUTPUT/checkpoints; the result is exported to OUTPUT/model.

example:
  decipher-mr align --config configs/align-demo.json cache=demo/cache output=runs/align
  torchrun --nproc_per_node 2 -m decipher_mr align --config configs/align-demo.json batch_size=32
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON config (see DecipherMRTraining/configs/align-*.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help='override config values, e.g. iterations=50 text_trainable=\'"frozen"\' chunks=4')


def run(args: argparse.Namespace) -> int:
    from decipher_mr.models.clip import AlignedModelError
    from decipher_mr.models.text import TextTowerError
    from decipher_mr.train.align import ALIGN_DEFAULTS, train_align
    from decipher_mr.train.run_config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, ALIGN_DEFAULTS, args.overrides)
        train_align(cfg)
    except (ConfigError, TextTowerError, AlignedModelError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"align: error: {exc}", file=sys.stderr)
        return 2
    return 0
