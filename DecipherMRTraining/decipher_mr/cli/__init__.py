"""The ``decipher-mr`` command line.

Each subcommand lives in its own module under ``decipher_mr.cli`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``. Only the chosen subcommand's module is imported, so ``decipher-mr --help``
is instant and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line summary). Order is the order of the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("demo_data", "build the offline demo corpus from real MRI (generated lesions and reports)"),
    "manifest": ("manifest", "write the JSONL manifest from a BIDS dataset or a DICOM tree, with reports joined on a key"),
    "prepare": ("prepare", "preprocess a manifest's series once into a fast, resumable cache"),
    "pretrain-vision": ("pretrain_vision", "stage 1: DINOv2 + iBOT self-supervised pretraining of the 3D ViT"),
    "pretrain-text": ("pretrain_text", "stage 1: masked-language-model pretraining of the text encoder on reports"),
    "align": ("align", "stage 2: CLIP alignment of image and report in a shared 512-d space"),
    "train-head": ("train_head", "train a task head (classify, regress, segment, anomaly, ground, localize) on the frozen encoder"),
    "evaluate": ("evaluate", "evaluate retrieval, zero-shot classification and heads"),
    "export": ("export", "pack encoder, text tower, projections and heads into one verified model bundle"),
    "verify": ("verify", "check a model bundle (checksums, format, safe weights) and print what it holds"),
    "infer": ("infer", "run a bundle on one volume or a batch (manifest, BIDS, folder): segmentation, anomaly, localization, text grounding"),
    "worker": ("worker", "keep a bundle loaded and answer JSON-lines requests on stdin/stdout"),
    "index": ("index", "build and search a retrieval index of image and report embeddings"),
    "view": ("view", "open volumes in a web browser on Slicer's scene, with the DecipherMR panel (trame-slicer)"),
}

EPILOG = """\
a typical run on the demo corpus (`make demo` runs all of it):
  decipher-mr demo-data --out demo/data
  decipher-mr prepare demo/data/manifest.jsonl --out demo/cache --spacing 2
  decipher-mr pretrain-vision --config DecipherMRTraining/configs/vit-small-demo.json run_dir=demo/runs/vision
  decipher-mr align --config DecipherMRTraining/configs/align-demo.json 'vision={"export": "demo/runs/vision"}'
  decipher-mr train-head --task segment --config DecipherMRTraining/configs/heads-segment.json
  decipher-mr export --out demo/bundle.zip --align runs/align-demo --head segment=runs/heads/segment
  decipher-mr infer --bundle demo/bundle.zip --volume demo/data/images/brain-000.nii.gz --out demo/infer

run `decipher-mr COMMAND --help` for the options and an example of each command.
DecipherMR is a research tool, not a medical device: never use it for clinical decisions.
"""


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if importlib.util.find_spec(f"decipher_mr.cli.{spec[0]}") is not None
    }


def build_parser(commands: dict[str, tuple[str, str]], chosen: str | None = None) -> argparse.ArgumentParser:
    from decipher_mr import __version__

    parser = argparse.ArgumentParser(
        prog="decipher-mr",
        description="DecipherMR: 3D MRI vision-language foundation model toolkit (research use only).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"decipher-mr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, summary) in commands.items():
        if name == chosen:
            mod = importlib.import_module(f"decipher_mr.cli.{module}")
            p = sub.add_parser(
                name,
                help=summary,
                description=(mod.__doc__ or summary).strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(commands, chosen if chosen in commands else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
