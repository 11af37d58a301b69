"""Benchmark: batch `decipher-mr infer` against one `decipher-mr infer` process per volume, same run.

Volumes: the demo corpus's first volumes (real Colin27/MNI152 anatomy with synthetic lesions, and phantoms,
built offline by :func:`decipher_mr.data.demo.build_demo_corpus`). Model: a bundle shaped like the demo's
(vit-tiny encoder, the packaged MiniLM text tower, a segmentation and an anomaly head, 1.5 mm
preprocessing), randomly initialised: speed does not depend on trained weights. Both ways run the
same tasks (segment, anomaly) as fresh processes, timed wall-clock from start to exit, so the batch's
gain is what a user sees: the bundle and the libraries load once instead of once per volume.

    .venv/bin/python Testing/bench/bench_batch_infer.py [--volumes 4] [--preset vit-tiny]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_bundle(folder: Path, preset: str) -> Path:
    import torch

    from decipher_mr.bundle import HeadExport, write_bundle
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.heads import build_head
    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(0)
    vision = build_vision_encoder(preset)
    d, depth = vision.config.embed_dim, vision.config.depth
    model = ImageTextModel(vision, TextTower.from_spec(None)).eval()
    layers = [max(1, depth // 3), max(1, 2 * depth // 3), depth]
    labels = ["background", "frontal lobe", "parietal lobe", "temporal lobe", "occipital lobe", "cerebellum"]
    heads = [HeadExport.from_head("lobes", build_head("segment", {"embed_dim": d, "labels": labels, "layers": layers})),
             HeadExport.from_head("lesion", build_head("anomaly", {"embed_dim": d, "layers": layers}))]
    return write_bundle(folder / "bundle", model=model, heads=heads, preprocess=PreprocessConfig(), name="bench-batch")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "decipher_mr", "infer", *args]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=4, help="demo volumes to run (default 4)")
    ap.add_argument("--preset", default="vit-tiny", help="encoder preset of the bundle (the demo's: vit-tiny)")
    ap.add_argument("--tasks", default="segment,anomaly")
    args = ap.parse_args()

    from decipher_mr.data.demo import build_demo_corpus
    from decipher_mr.data.io import read_volume
    from decipher_mr.data.manifest import read_manifest, write_manifest

    with tempfile.TemporaryDirectory(prefix="bench_batch_infer_") as tmp:
        tmp = Path(tmp)
        corpus = build_demo_corpus(tmp / "demo", subjects=args.volumes, seed=0, progress=False)
        rows = read_manifest(corpus)[: args.volumes]
        manifest = write_manifest([{"image": r.image, "id": r.id} for r in rows], tmp / "batch.jsonl")
        shapes = {tuple(read_volume(r.image).shape) for r in rows}
        bundle = make_bundle(tmp, args.preset)
        print(f"{len(rows)} demo volumes {sorted(shapes)}; bundle {args.preset} + MiniLM text, tasks {args.tasks}; "
              f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, {os.cpu_count()} CPUs")

        common = ["--bundle", str(bundle), "--tasks", args.tasks, "--device", "cpu"]
        single_times = []
        for n, r in enumerate(rows):
            dt, proc = timed(cli(*common, "--volume", r.image, "--out", str(tmp / "single" / r.id), "--no-previews"))
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            single_times.append(dt)
        single = sum(single_times)

        dt_batch, proc = timed(cli(*common, "--volume", str(manifest), "--out", str(tmp / "batch"), "--no-progress"))
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        with open(tmp / "batch" / "infer_summary.csv", newline="") as fh:
            status = [row["status"] for row in csv.DictReader(fh)]
        assert status == ["ok"] * len(rows), status
        dt_rerun, _ = timed(cli(*common, "--volume", str(manifest), "--out", str(tmp / "batch"), "--no-progress"))

        # same outputs both ways
        a = read_volume(tmp / "batch" / rows[0].id / "segmentation.nii.gz").array
        b = read_volume(tmp / "single" / rows[0].id / "segmentation.nii.gz").array
        same = bool(np.array_equal(a, b))

        n = len(rows)
        result = {
            "volumes": n,
            "per_volume_calls_s": round(single, 2),
            "per_volume_calls_volumes_per_s": round(n / single, 3),
            "per_call_median_s": round(float(np.median(single_times)), 2),
            "batch_s": round(dt_batch, 2),
            "batch_volumes_per_s": round(n / dt_batch, 3),
            "batch_speedup": round(single / dt_batch, 2),
            "rerun_all_skipped_s": round(dt_rerun, 2),
            "same_segmentation": same,
        }
        print(f"per-volume calls: {n} x `decipher-mr infer` in {single:.1f} s = {n / single:.3f} volumes/s "
              f"(median {np.median(single_times):.1f} s per call)")
        print(f"batch:            1 x `decipher-mr infer` on a manifest in {dt_batch:.1f} s = {n / dt_batch:.3f} volumes/s")
        print(f"ratio batch / per-volume throughput: {single / dt_batch:.2f}x; rerun (all skipped) {dt_rerun:.1f} s; "
              f"same segmentation: {same}")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
