"""Build the offline demo corpus: real brain anatomy (Colin27, MNI152, AAL regions) turned into many
augmented subjects, plus procedural knee/spine/abdomen phantoms, synthetic lesions and generated
reports. The same --seed always gives the same arrays and reports. Nothing is downloaded.

The corpus is generated material for exercising the pipeline, not clinical data; DIR/README.md and
the manifest's "generated" field say what is real and what is synthetic.

example:
  decipher-mr demo-data --out demo/data --subjects 48 --seed 0
  decipher-mr prepare demo/data/manifest.jsonl --out demo/cache
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from decipher_mr.data.demo.corpus import DEFAULT_SUBJECTS

    parser.add_argument("--out", required=True, help="folder to write the corpus into (created if missing)")
    parser.add_argument(
        "--subjects",
        type=int,
        default=DEFAULT_SUBJECTS,
        help=f"number of series (default {DEFAULT_SUBJECTS}: half brain, the rest knee/spine/abdomen; at least 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes building subjects in parallel (default 1); the files are the same for any number")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from decipher_mr.assets import AssetMissing
    from decipher_mr.data.demo import build_demo_corpus, summarize

    if args.subjects < 3:
        print(f"error: --subjects must be at least 3 (one each for train, val and test), got {args.subjects}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        manifest = build_demo_corpus(args.out, subjects=args.subjects, seed=args.seed, progress=not args.quiet,
                                     workers=max(1, args.workers))
    except AssetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: could not build the demo corpus in {args.out}: {exc}", file=sys.stderr)
        return 1
    counts = summarize(manifest)
    total = sum(counts["split"].values())
    print(f"demo corpus: {total} series in {manifest.parent} ({time.perf_counter() - start:.0f} s)")
    print(f"  manifest: {manifest}")
    for key, title in (("body_region", "body region"), ("sequence", "sequence"), ("finding", "finding"),
                       ("lesion_type", "lesion type"), ("split", "split")):
        print(f"  {title + ':':13s}" + ", ".join(f"{k} {v}" for k, v in sorted(counts[key].items())))
    print("  generated material (lesions, reports, non-brain phantoms): not clinical data; see README.md")
    if total < args.subjects:
        print(f"warning: {args.subjects - total} subject(s) failed and were skipped (see messages above)", file=sys.stderr)
    return 0
