"""Check a model bundle and print what it holds; exit code 0 when it can be trusted, 1 when not.

Checks the format version, the sha256 of every file against the manifest, that no file is missing,
unlisted, pickled or a link, that the zip has no entry escaping its folder, and that every weight
loads into the module config.json describes.

examples:
  decipher-mr verify model.zip
  decipher-mr verify runs/bundle --json
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle to check: a .zip or a bundle folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError
    from decipher_mr.bundle.reader import describe_summary, verify_bundle

    try:
        summary = verify_bundle(args.bundle)
    except BundleError as exc:
        print(f"verify: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else describe_summary(summary))
    if not args.json:
        print("verify: OK")
    return 0
