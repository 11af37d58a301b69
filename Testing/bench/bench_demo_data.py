"""Benchmark: how long the default demo corpus takes to build, against only writing its files.

Times, in the same run:

* loading the two real brain templates (Colin27 + AAL, MNI152 + tissue maps; once per process),
* building the corpus (default 48 subjects: brain 24, knee/spine/abdomen 8 each),
* the baseline: reading every written volume back and writing it again with ``write_volume`` —
  the compressed-NIfTI I/O floor that any generator of these files pays.

It prints each time, seconds per subject and the ratio build / I/O baseline.

    .venv/bin/python Testing/bench/bench_demo_data.py [--subjects 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import SimpleITK as sitk

    from decipher_mr.data.demo import build_demo_corpus
    from decipher_mr.data.demo.anatomy import colin27, mni152
    from decipher_mr.data.volume import Volume, write_volume

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        colin27()
        mni152()
        templates_s = time.perf_counter() - t
        t = time.perf_counter()
        manifest = build_demo_corpus(Path(tmp) / "corpus", subjects=args.subjects, seed=args.seed, progress=False)
        build_s = time.perf_counter() - t
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        files = sorted({manifest.parent / row[k] for row in rows for k in ("image", "mask", "regions", "tissue")})
        t = time.perf_counter()
        for n, path in enumerate(files):
            write_volume(Volume.from_sitk(sitk.ReadImage(str(path))), Path(tmp) / "io" / f"{n}.nii.gz")
        io_s = time.perf_counter() - t

    print(f"templates loaded:        {templates_s:6.1f} s (once per process)")
    print(f"corpus built:            {build_s:6.1f} s for {len(rows)} subjects ({build_s / len(rows):.2f} s/subject)")
    print(f"I/O baseline:            {io_s:6.1f} s (read + write the same {len(files)} volumes)")
    print(f"total (templates+build): {templates_s + build_s:6.1f} s")
    print(f"ratio build / I/O baseline: {build_s / io_s:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
