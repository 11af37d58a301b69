"""Benchmark: how fast `prepare` turns real MRI volumes into the cache, and what the cache buys.

Prints the preparation throughput (volumes/s) on the real Colin27-grid volumes at 1.5 mm, and the
time to load one prepared item (``PreparedCache.load`` + a copy into memory) against decoding and
resampling its source, measured in the same run (target: loading at least 10x faster).

    .venv/bin/python Testing/bench/bench_prepare.py [--spacing 1.5] [--workers 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from decipher_mr.assets import MRICRON_TEMPLATES, aal_atlas, colin27_t1
from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.io import read_volume
from decipher_mr.data.manifest import write_manifest
from decipher_mr.data.prepare import prepare_manifest
from decipher_mr.data.preprocess import PreprocessConfig, preprocess_volume


def sources() -> list[Path]:
    """Real volumes installed by mricron-data (anatomy and atlases used as images)."""
    paths = [colin27_t1("ch2"), colin27_t1("ch2bet"), colin27_t1("ch2better"), aal_atlas()]
    paths += [MRICRON_TEMPLATES / "brodmann.nii.gz"]
    return [p for p in paths if Path(p).exists()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = PreprocessConfig(target_spacing=(args.spacing,) * 3)
    paths = sources()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest([{"image": str(p)} for p in paths], Path(tmp) / "manifest.jsonl")
        start = time.perf_counter()
        summary = prepare_manifest(manifest, Path(tmp) / "cache", config, workers=args.workers, progress=False)
        elapsed = time.perf_counter() - start
        if not summary.ok:
            print(summary.describe())
            return 1
        throughput = len(summary.prepared) / elapsed

        cache = PreparedCache(Path(tmp) / "cache")
        load_times, decode_times = [], []
        for i, item in enumerate(cache.items):
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                arr = np.asarray(cache.load(i)).copy()
                load_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again, _ = preprocess_volume(read_volume(item.source), config)
            decode_times.append(time.perf_counter() - t0)
            assert np.array_equal(arr, again), f"{item.id}: cache differs from a fresh preparation"
            print(f"  {item.id:10s} {str(tuple(item.shape)):18s} load {statistics.median(load_times[-args.repeats:]):.4f} s, "
                  f"decode+resample {decode_times[-1]:.3f} s")

    load, decode = statistics.median(load_times), statistics.median(decode_times)
    ratio = decode / load
    print(
        f"prepare: {throughput:.2f} volumes/s ({len(paths)} real volumes, {args.spacing} mm, {args.workers} worker(s)); "
        f"load prepared: {load:.4f} s vs decode+resample {decode:.3f} s -> {ratio:.0f}x faster (target >= 10x)"
    )
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
