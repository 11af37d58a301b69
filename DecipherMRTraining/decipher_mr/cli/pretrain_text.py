"""Stage 1 (text): masked-language-model pretraining of the text encoder on the cache's reports.

Continues pretraining a local Hugging Face BERT-family folder (default: the packaged
all-MiniLM-L6-v2) with 15 % BERT masking on the reports of the prepared cache's train split, and
prints the held-out (val split) perplexity before and after. Re-running the same command resumes
from the newest checkpoint in OUTPUT/checkpoints. Report text is never printed or logged.

example:
  decipher-mr pretrain-text --config configs/text-demo.json cache=demo/cache output=runs/text iterations=100
  torchrun --nproc_per_node 2 -m decipher_mr pretrain-text --config configs/text-demo.json
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON config (see DecipherMRTraining/configs/text-*.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. iterations=50 text.tiny=true output=runs/t")


def run(args: argparse.Namespace) -> int:
    from decipher_mr.models.text import TextTowerError
    from decipher_mr.train.mlm import MLM_DEFAULTS, train_mlm
    from decipher_mr.train.run_config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, MLM_DEFAULTS, args.overrides)
        train_mlm(cfg)
    except (ConfigError, TextTowerError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pretrain-text: error: {exc}", file=sys.stderr)
        return 2
    return 0
