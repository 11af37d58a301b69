"""Stage 1: self-supervised pretraining of the 3D ViT (DINOv2-style DINO + iBOT + KoLeo) on a prepared cache.

Runs on one CPU or GPU, and unchanged under torchrun (DDP: gloo on CPU, NCCL on GPU). Checkpoints go
to RUN_DIR/checkpoints; --resume continues exactly where the last run stopped; SIGTERM/Ctrl-C writes
a checkpoint and exits cleanly. At the end the teacher backbone is exported to RUN_DIR/encoder.safetensors.

examples:
  decipher-mr pretrain-vision --config DecipherMRTraining/configs/vit-small-demo.json \\
      data.cache=demo/cache run_dir=runs/vision train.iterations=200
  decipher-mr pretrain-vision --config DecipherMRTraining/configs/vit-small-demo.json run_dir=runs/vision --resume
  torchrun --nproc_per_node=2 -m decipher_mr pretrain-vision --config DecipherMRTraining/configs/vit-base.json
  decipher-mr pretrain-vision --export-teacher runs/vision --out encoder.safetensors
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON config (see DecipherMRTraining/configs/); defaults otherwise")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.iterations=200 data.cache=demo/cache run_dir=runs/a")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    parser.add_argument("--export-teacher", metavar="RUN_DIR",
                        help="do not train: export the teacher backbone of RUN_DIR's latest checkpoint")
    parser.add_argument("--out", help="with --export-teacher: output .safetensors path (default RUN_DIR/encoder.safetensors)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from decipher_mr.train.checkpoint import CheckpointError
    from decipher_mr.train.run_config import ConfigError

    if args.export_teacher:
        from decipher_mr.train.ssl.export import export_teacher_backbone

        out = Path(args.out) if args.out else Path(args.export_teacher) / "encoder.safetensors"
        try:
            path = export_teacher_backbone(args.export_teacher, out)
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"teacher backbone written to {path} (+ {path.with_suffix('.json').name})")
        return 0

    from decipher_mr.train.ssl.trainer import load_config, train

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = summary["end"]
    if summary["stopped_by_signal"]:
        print(f"stopped cleanly at iteration {done}; checkpoint {summary['checkpoint']}")
        return 0
    losses = summary["losses"]
    tail = f", last loss {losses[-1]:.4f}" if losses else ""
    print(f"trained iterations {summary['start']}..{done} ({summary['precision']}, {summary['world_size']} process(es), "
          f"{summary.get('backend') or 'no process group'}){tail}; "
          f"skipped steps {summary['skipped_steps']}; checkpoint {summary['checkpoint']}")
    if summary["encoder"]:
        print(f"teacher encoder exported to {summary['encoder']}")
    return 0
