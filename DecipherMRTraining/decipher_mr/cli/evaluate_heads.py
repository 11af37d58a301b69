"""`decipher-mr evaluate heads`: the body of the subcommand (argument parsing lives in evaluate.py)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _s(v, unit: str = "") -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}{unit}"
    return f"{v}{unit}"


def run_heads(args: argparse.Namespace) -> int:
    """Evaluate each run, print one line per run, add the SegResNet comparison, write the report."""
    from decipher_mr.data.cache import CacheError, PreparedCache
    from decipher_mr.eval.heads import compare_with_segresnet, evaluate_head
    from decipher_mr.eval.heads_report import PRIMARY, write_heads_report
    from decipher_mr.heads import HeadError

    splits = args.split if isinstance(args.split, list) else [args.split]
    results, comparison = [], None
    try:
        cache = PreparedCache(args.cache)
        for run in args.run:
            res = evaluate_head(run, cache, splits, progress=not getattr(args, "no_progress", False))
            results.append(res)
            key = PRIMARY[res["task"]]
            print(f"{run}: {res['task']} on {res['n']} items: {key} {_s(res['metrics'].get(key))} "
                  f"(baseline, {res['baseline']['name']}: {_s(res['baseline'].get(key))})")
        seg = next((r for r in results if r["task"] == "segment"), None)
        if seg is not None and not args.no_baseline:
            print("training MONAI SegResNet from scratch on the same split and wall-clock budget ...", flush=True)
            comparison = compare_with_segresnet(seg["run"], cache, args.baseline_budget)
            print(f"Dice (validation): head {_s(comparison['head_final_dice'])} after {comparison['head_seconds']:.0f} s "
                  f"(feature extraction included), SegResNet {_s(comparison['baseline']['final_dice'])} "
                  f"after {comparison['baseline']['budget_s']:.0f} s")
            print(f"time to reach SegResNet's final Dice: head {_s(comparison['head_time_to_baseline'], ' s')}, "
                  f"SegResNet {_s(comparison['baseline_time_to_baseline'], ' s')}")
    except (HeadError, CacheError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"evaluate heads: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run[0]) / "eval-heads"
    js, md = write_heads_report(results, out, comparison)
    print(f"wrote {js} and {md}")
    return 0
