"""Pack a trained model into one verified bundle (folder or .zip) for inference and 3D Slicer.

The bundle holds the encoder, the text tower and projections of an aligned run, any trained heads,
the preprocessing the encoder expects, a model card and a sha256 manifest (see
decipher_mr.bundle.format). It is written atomically: an interrupted export leaves no half bundle.

examples:
  decipher-mr export --out model.zip --align runs/align --head tissue=runs/heads/tissue
  decipher-mr export --out encoder.zip --vision runs/vision/encoder --preprocess demo/cache
  decipher-mr export --config export.json     # {"out": ..., "align": ..., "heads": {"tissue": ...}}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="bundle to write: NAME.zip (one file) or a folder")
    parser.add_argument("--vision", help="stage-1 encoder export or run folder (or a preset such as vit-micro "
                                         "for an untrained smoke-test bundle); not needed with --align")
    parser.add_argument("--align", help="stage-2 alignment run folder (or its model/ export)")
    parser.add_argument("--head", action="append", default=[], metavar="NAME=RUN",
                        help="a trained head to include (repeatable)")
    parser.add_argument("--preprocess", help="prepared cache folder (or preprocessing JSON) the model was trained "
                                             "on; default: the cache recorded by the runs")
    parser.add_argument("--name", help="bundle name shown in the model card (default: the output's stem)")
    parser.add_argument("--config", help="JSON file with any of the keys out, vision, align, heads "
                                         "({name: run}), preprocess, name; flags override it")


def _merged(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the export config ({exc})") from exc
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: the export config must be a JSON object")
        unknown = sorted(set(cfg) - {"out", "vision", "align", "heads", "preprocess", "name"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
    heads = dict(cfg.get("heads") or {})
    for spec in args.head:
        name, _, run = spec.partition("=")
        if not run:
            raise ValueError(f"--head {spec!r}: expected NAME=RUN (e.g. tissue=runs/heads/tissue)")
        heads[name] = run
    for key in ("out", "vision", "align", "preprocess", "name"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    cfg["heads"] = heads
    if not cfg.get("out"):
        raise ValueError("--out is required (a .zip file or a folder)")
    if not cfg.get("vision") and not cfg.get("align"):
        raise ValueError("nothing to export: give --align RUN and/or --vision ENCODER")
    return cfg


def run(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError, HeadExport, write_bundle
    from decipher_mr.bundle.sources import (
        check_head_encoder, describe_cache, find_training_cache, load_aligned, load_head_run, load_vision, read_preprocess, same_weights,
    )

    try:
        cfg = _merged(args)
        out = Path(cfg["out"])
        model, vision, training = None, None, {}
        if cfg.get("align"):
            print(f"export: loading the aligned model from {cfg['align']}", file=sys.stderr)
            model, record = load_aligned(cfg["align"])
            training["align"] = record.get("summary") or {}
        if cfg.get("vision"):
            print(f"export: loading the vision encoder from {cfg['vision']}", file=sys.stderr)
            vision = load_vision(cfg["vision"])
            if model is not None:
                if not same_weights(vision, model.vision):
                    raise BundleError(
                        f"{cfg['vision']}: differs from the encoder inside the aligned model {cfg['align']}; the "
                        "projections were trained on the aligned one, so export with --align alone")
                vision = None
        heads = []
        for name, run_dir in sorted(cfg["heads"].items()):
            print(f"export: loading head {name} from {run_dir}", file=sys.stderr)
            hname, head, metrics, record, folder = load_head_run(f"{name}={run_dir}")
            check_head_encoder(hname, record, folder, model.vision if model is not None else vision)
            heads.append(HeadExport.from_head(hname, head, metrics))
        if cfg.get("preprocess"):
            preprocess = read_preprocess(cfg["preprocess"])
            cache = Path(cfg["preprocess"])
            cache = cache if cache.is_dir() else cache.parent
        else:
            cache = find_training_cache([cfg.get("align"), cfg.get("vision"), *cfg["heads"].values()])
            print(f"export: preprocessing from the training cache {cache}", file=sys.stderr)
            preprocess = read_preprocess(cache)
        data = describe_cache(cache)
        if data:
            training["data"] = data
        name = cfg.get("name") or out.stem
        write_bundle(out, preprocess=preprocess, model=model, vision=vision, heads=heads, name=name,
                     training=training, progress=True)
    except (BundleError, ValueError, OSError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 1
    from decipher_mr.bundle.reader import describe_summary, verify_bundle

    print(f"export: wrote {out}; checking it loads", file=sys.stderr)
    try:
        print(describe_summary(verify_bundle(out)))
    except BundleError as exc:  # a bundle we just wrote must load; say so loudly if not
        print(f"export: error: the written bundle does not verify: {exc}", file=sys.stderr)
        return 1
    print("DecipherMR bundles are for research use only, not for clinical decisions.")
    return 0
