"""Benchmark: what a trusted bundle costs to export and load, against loading bare weights.

Exports an image-only bundle of a randomly initialised encoder (default ``vit-small``) as a zip,
then times, in the same run:

* the first ``load_bundle`` (extraction into the per-user cache + full verification + build),
* a cached ``load_bundle`` (verification + build; the zip is already extracted),
* the baseline: building the same encoder and loading ``vision/encoder.safetensors`` directly,
  with no checksum, header or manifest check.

It prints each time and the ratio cached-load / baseline: the price of verifying on every load.

    .venv/bin/python Testing/bench/bench_bundle.py [--preset vit-small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DECIPHER_MR_CACHE"] = str(Path(tmp) / "cache")
        from decipher_mr.bundle import load_bundle, write_bundle
        from decipher_mr.data.preprocess import PreprocessConfig
        from decipher_mr.models.vit3d import build_vision_encoder

        torch.manual_seed(0)
        encoder = build_vision_encoder(args.preset).eval()
        out = Path(tmp) / "model.zip"
        t = time.perf_counter()
        write_bundle(out, vision=encoder, preprocess=PreprocessConfig())
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        bundle = load_bundle(out)
        first_s = time.perf_counter() - t
        weights = bundle.folder / bundle.config["vision"]["weights"]
        cached, bare = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            load_bundle(out)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain = build_vision_encoder(bundle.config["vision"]["config"])
            plain.load_state_dict(load_file(str(weights)), strict=True)
            bare.append(time.perf_counter() - t)
        cached_s, bare_s = statistics.median(cached), statistics.median(bare)
        size = out.stat().st_size / 2**20
        print(f"bundle {args.preset}: {size:.1f} MiB zip, {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M parameters")
        print(f"export (stage + checksums + zip):        {export_s:.3f} s")
        print(f"first load (extract + verify + build):   {first_s:.3f} s")
        print(f"cached load (verify + build), median:    {cached_s:.3f} s")
        print(f"baseline bare safetensors load, median:  {bare_s:.3f} s")
        print(f"ratio cached verified load / bare load:  {cached_s / bare_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
