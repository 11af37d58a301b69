"""Evaluate an aligned model: cross-modal retrieval and zero-shot classification by text prompts.

`retrieval --bundle` embeds every image and report of a held-out split through the bundle's Session
(Session.image_embedding of the original files: the embedding users get in the index, the viewer and
Slicer) and reports image→report and report→image recall@1/5/10 and median rank, volume→report
body-region precision@5 (with --index: through the index's own search, as 'Reports like this
volume' shows it), and zero-shot body region / sequence / lesion classification from prompts such
as "MRI of the knee", "T2-weighted MRI", "lesion in the left frontal lobe" vs "normal study". Every
figure has a 95% bootstrap interval by study, its count and its chance level; one whose interval
holds chance is marked "not distinguishable from chance". Writes retrieval.json and retrieval.md
(numbers only, never report text). `--checkpoint` evaluates an align run's training view instead
(a diagnostic while training).

`probes` fits k-NN and linear probes on frozen features (Session.image_features) of each --encoder
bundle and of a random-init encoder of the same architecture: does pretraining help?

`heads` evaluates train-head runs on held-out items next to trivial baselines (majority class, mean,
empty mask, constant map, centre point); for a segmentation head it also trains MONAI SegResNet from
scratch with the same split and wall-clock budget and prints both Dice values and the time each
needs to reach SegResNet's final Dice. Writes heads.json, heads.md and PNG figures.

example:
  decipher-mr evaluate retrieval --bundle demo/bundle.zip --manifest demo/data/manifest.jsonl --index demo/index
  decipher-mr evaluate probes --encoder "stage 1=runs/vision.zip" --encoder aligned=demo/bundle.zip \
      --random-like "stage 1" --manifest demo/data/manifest.jsonl --out runs/eval-probes
  decipher-mr evaluate heads --run runs/heads/segment --cache demo/cache --split val test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    r = sub.add_parser("retrieval", help="retrieval, body-region precision and zero-shot metrics of a bundle through "
                       "Session (--bundle, what users get), with 95%% intervals; or an align run's training view (--checkpoint)")
    r.add_argument("--bundle", help="exported model bundle: every embedding is Session.image_embedding of the original file")
    r.add_argument("--manifest", help="manifest (JSONL) with the split's images and reports (with --bundle)")
    r.add_argument("--index", help="retrieval index of the bundle (decipher-mr index build): adds 'Reports like this "
                   "volume' body-region precision@5 through the index's own search")
    r.add_argument("--device", default="auto", help="device for --bundle (default: auto)")
    r.add_argument("--checkpoint", help="align run folder: the training view on the prepared cache (a diagnostic, "
                   "not what users get)")
    r.add_argument("--cache", help="prepared cache folder (with --checkpoint)")
    r.add_argument("--split", default="test", help="split to evaluate (default: test)")
    r.add_argument("--out", help="folder for retrieval.json/.md (default: next to the bundle or run, eval-SPLIT)")
    r.add_argument("--image-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="image view size (default: the one the model was aligned with)")
    r.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("probes", help="k-NN and linear probes (body region, sequence, lesion) on frozen features of "
                       "several encoders next to a random-init encoder of the same architecture")
    p.add_argument("--encoder", action="append", required=True, metavar="NAME=BUNDLE",
                   help="a bundle to probe (repeat), e.g. 'stage 1=runs/vision.zip' 'aligned=demo/bundle.zip'")
    p.add_argument("--random-like", metavar="NAME", help="add a random-init encoder with the architecture of encoder NAME")
    p.add_argument("--manifest", required=True, help="manifest (JSONL) with train and evaluation splits")
    p.add_argument("--split", default="test", help="split to score (default: test); probes fit on 'train'")
    p.add_argument("--view", help='image view as JSON, e.g. \'{"mode": "view", "size": [64, 64, 16], "mm": [176, 176, 128]}\' '
                   "(a stage-1 global crop's geometry); default: the aligned bundle's view")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (default: 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="folder for probes.json/.md")
    p.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("summary", help="one short table (figure, 95%% interval, n, chance) from evaluation folders")
    t.add_argument("folders", nargs="+", help="folders holding retrieval.json, probes.json, heads.json")
    t.add_argument("--out", help="also write the table to this Markdown file")
    h = sub.add_parser("heads", help="task heads of an exported bundle through Session on a manifest, with 95%% "
                       "bootstrap intervals (--bundle); or train-head runs on the prepared cache (--run)")
    h.add_argument("--bundle", help="exported model bundle (folder or zip): evaluate what users run (Session)")
    h.add_argument("--manifest", help="manifest (JSONL) with image, mask, regions, labels, study_id (with --bundle)")
    h.add_argument("--device", default="auto", help="device for --bundle (default: auto)")
    h.add_argument("--query", default="{words} in the {location}",
                   help="grounding query template from lesion metadata (default: '{words} in the {location}')")
    h.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws by study (default: 1000)")
    h.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    h.add_argument("--run", nargs="+", help="train-head run folder(s) (training view; --fraction runs give the low-data curve)")
    h.add_argument("--cache", help="prepared cache folder (with --run)")
    h.add_argument("--split", default=["test"], nargs="+", help="split(s) to evaluate, or 'all' with --bundle (default: test)")
    h.add_argument("--out", help="folder for heads.json/.md (default: BUNDLE_FOLDER/eval-heads or FIRST_RUN/eval-heads)")
    h.add_argument("--no-progress", action="store_true")
    h.add_argument("--baseline-budget", type=float, help="seconds for the SegResNet baseline (default: the head's training time)")
    h.add_argument("--no-baseline", action="store_true", help="skip the SegResNet comparison")


def run(args: argparse.Namespace) -> int:
    if args.what == "retrieval" and args.bundle:
        from decipher_mr.cli.evaluate_served import run_served_retrieval

        return run_served_retrieval(args)
    if args.what == "retrieval":
        if not (args.checkpoint and args.cache):
            print("evaluate retrieval: give --bundle and --manifest (what users get), or --checkpoint and --cache",
                  file=sys.stderr)
            return 2
        return _retrieval(args)
    if args.what == "summary":
        from decipher_mr.cli.evaluate_served import run_summary

        return run_summary(args)
    if args.what == "probes":
        from decipher_mr.cli.evaluate_served import run_probes

        return run_probes(args)
    if args.what == "heads":
        from decipher_mr.cli.evaluate_heads import run_heads

        return run_heads(args)
    print(f"evaluate: unknown evaluation {args.what!r}", file=sys.stderr)
    return 2


def _retrieval(args: argparse.Namespace) -> int:
    from decipher_mr.data.cache import CacheError, PreparedCache
    from decipher_mr.eval.report import DEFAULT_IMAGE, evaluate_retrieval, write_retrieval_report
    from decipher_mr.models.clip import AlignedModelError, load_image_text_model
    from decipher_mr.models.text import TextTowerError

    try:
        model = load_image_text_model(args.checkpoint)
        cache = PreparedCache(args.cache)
        run_dir = Path(args.checkpoint)
        model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
        record = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        image_cfg = dict(record.get("training", {}).get("image", DEFAULT_IMAGE))
        image_cfg.pop("augment", None)
        if args.image_size:
            image_cfg["size"] = list(args.image_size)
        result = evaluate_retrieval(model, cache, args.split, image_cfg, progress=not args.no_progress)
    except (AlignedModelError, TextTowerError, CacheError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate retrieval: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (model_dir.parent if model_dir.name == "model" else model_dir) / f"eval-{args.split}"
    json_path, md_path = write_retrieval_report(result, out)
    r = result["retrieval"]
    print(f"{result['n']} pairs in split {args.split!r}: image→report R@1 {r['image_to_report']['R@1']:.3f} "
          f"R@10 {r['image_to_report']['R@10']:.3f} (chance {r['chance']['R@10']:.3f}); "
          f"report→image R@10 {r['report_to_image']['R@10']:.3f}")
    print(f"wrote {json_path} and {md_path}")
    return 0
