"""Keep a model bundle loaded and answer requests as line-delimited JSON on stdin/stdout.

Meant to be started by a program (the 3D Slicer module, decipher_mr.inference.client), not typed
at: the protocol is in docs/worker-protocol.md. Result files go to --out (default: a new
temporary folder) unless a request names its own.

example:
  echo '{"id": 1, "method": "segment", "params": {"volume": "t1.nii.gz"}}' | \\
      decipher-mr worker --bundle demo/model.zip --out demo/worker
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="model bundle (folder or .zip)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", default=None, help="folder for result files (default: a new temporary folder)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="encode volumes with more patches than this in sliding windows (default 4096)")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from decipher_mr.inference.worker import run_worker

    code = run_worker(args.bundle, device=args.device, out=args.out, max_tokens=args.max_tokens)
    # Leave without interpreter finalisation: after a `shutdown` request the worker's stdin reader (a
    # daemon thread) may still be blocked in a read holding stdin's buffer lock, and finalisation then
    # aborts with "could not acquire lock for <stdin> at interpreter shutdown" and exit status 1 (seen in
    # the full test suite). Everything the worker wrote is flushed first; it owns no other resources.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
