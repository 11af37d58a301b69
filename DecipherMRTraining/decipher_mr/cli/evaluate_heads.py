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
    """``--bundle``: through Session on a manifest (what users run); ``--run``: train-head runs on the cache."""
    if getattr(args, "bundle", None):
        return run_heads_bundle(args)
    if not getattr(args, "run", None) or not getattr(args, "cache", None):
        print("evaluate heads: give --bundle BUNDLE --manifest MANIFEST (the served path), or --run RUN... --cache CACHE",
              file=sys.stderr)
        return 2
    return run_heads_runs(args)


def run_heads_bundle(args: argparse.Namespace) -> int:
    """Load the bundle into a Session, evaluate its heads on the manifest split, print the table, write reports."""
    from decipher_mr.bundle import BundleError
    from decipher_mr.data.manifest import ManifestError
    from decipher_mr.eval import stats
    from decipher_mr.eval.heads_session import (evaluate_heads_session, print_progress, summary_rows,
                                                write_heads_session_report)
    from decipher_mr.inference import InferenceError, Session

    if not args.manifest:
        print("evaluate heads: --bundle needs --manifest MANIFEST.jsonl", file=sys.stderr)
        return 2
    splits = args.split if isinstance(args.split, list) else [args.split]
    try:
        session = Session.from_bundle(args.bundle, device=args.device)
        result = evaluate_heads_session(session, args.manifest, splits, template=args.query, n_boot=args.bootstrap,
                                        seed=args.seed, progress=None if args.no_progress else print_progress)
    except (BundleError, ManifestError, InferenceError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"evaluate heads: error: {exc}", file=sys.stderr)
        return 2
    bundle = Path(args.bundle)
    out = Path(args.out) if args.out else (bundle if bundle.is_dir() else bundle.parent) / "eval-heads"
    js, md = write_heads_session_report(result, out)
    print(f"{result['evaluated']} of {result['rows']} rows of split {'/'.join(splits)} evaluated through Session "
          f"({result['session_stats'].get('encoder_passes', 0)} encoder passes); {len(result['errors'])} row error(s)")
    for e in result["errors"]:
        print(f"  not evaluated: line {e['row']} ({e['id'] or 'unparsed'}), field {e['field']!r}: {e['error']}",
              file=sys.stderr)
    print("\n".join(stats.TABLE_HEAD))
    for name, est in summary_rows(result):
        print(stats.table_row(name, est, 1 if "mm" in name else 3))
    print(f"wrote {js} and {md}")
    return 0 if result["evaluated"] else 1


def run_heads_runs(args: argparse.Namespace) -> int:
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
