"""Benchmark: the inference engine's four targets, each against a baseline measured in the same run.

1. **Text query** on an already-encoded 256x256x24 volume (real Colin27 slices) to a heatmap in the
   volume's geometry, on 2 CPU threads (target: median <= 0.3 s). Baseline: the same query on a cold
   cache (encoder pass included). A new query text each time, so the text tower always runs.
2. **Search over 1,000,000 x 512** unit embeddings (clustered, like real embeddings that group by
   region and finding): faiss IVF top-10 median latency (target <= 10 ms) and recall@10 against
   exact search (target >= 0.95); the exact brute-force time and the IVF build time are printed too.
3. **Peak memory segmenting a 512x512x160 volume** (target <= 6 GB), measured in a fresh process;
   the baseline is the same process's memory once the bundle and the volume are loaded.
4. **Encoding with the session** vs the bare encoder on the same prepared tensor (the stage-1
   encoder benchmark's measurement): the ratio should be ~1 (no hidden copies).
5. **Image embedding of a volume nobody has encoded yet** (an index build, *Reports like this volume*
   before any head ran): the aligned model's image view only. Baseline: the dense (sliding-window)
   encoding it used to run first, then the view.

The model is randomly initialised (``--preset``, default vit-small; the text tower is the packaged
MiniLM): speed and memory do not depend on trained weights.

    .venv/bin/python Testing/bench/bench_inference.py [--preset vit-small] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUERIES = ["left frontal lobe", "right temporal lobe lesion", "cerebellum", "enhancing mass near the ventricle",
           "occipital cortex", "periventricular white matter hyperintensity", "left hippocampus",
           "right parietal lobe", "brainstem"]


def make_bundle(folder: Path, preset: str, spacing) -> Path:
    import torch

    from decipher_mr.bundle import HeadExport, write_bundle
    from decipher_mr.data.views import DEFAULT_VIEW, check_view
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.heads import build_head
    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(0)
    vision = build_vision_encoder(preset)
    d, depth = vision.config.embed_dim, vision.config.depth
    model = ImageTextModel(vision, TextTower.from_spec(None)).eval()
    model.image_view = check_view(DEFAULT_VIEW)
    layers = [max(1, depth // 3), max(1, 2 * depth // 3), depth]
    heads = [HeadExport.from_head("grounding", build_head("ground", {"embed_dim": d, "text_dim": 512})),
             HeadExport.from_head("lobes", build_head("segment", {"embed_dim": d, "labels": ["background", "a", "b"],
                                                                  "layers": layers}))]
    pre = PreprocessConfig(target_spacing=spacing, crop_foreground=False)
    return Path(write_bundle(folder, model=model, heads=heads, preprocess=pre, name=f"bench-{preset}"))


def colin_slab():
    """256x256x24 from the real Colin27 T1: 24 axial slices 5 mm apart, padded in-plane to 256."""
    from decipher_mr.assets import colin27_t1
    from decipher_mr.data.io import read_volume
    from decipher_mr.data.volume import Volume

    vol = read_volume(colin27_t1())
    slab = vol.array[:, :, 40:160:5].astype(np.float32)
    out = np.zeros((256, 256, 24), np.float32)
    ox, oy = (256 - slab.shape[0]) // 2, (256 - slab.shape[1]) // 2
    out[ox:ox + slab.shape[0], oy:oy + slab.shape[1]] = slab
    return Volume(out, (0.9, 0.9, 5.0), vol.origin, vol.direction)


def bench_text_query(session, vol, repeats: int) -> None:
    session.encode(vol)
    session.ground(vol, "warm-up query")
    warm = []
    for q in QUERIES[:repeats]:
        t = time.perf_counter()
        hit = session.ground(vol, q)
        warm.append(time.perf_counter() - t)
    assert hit.heatmap.same_geometry(vol)
    cold = []
    for q in QUERIES[:3]:
        session.cache.clear()
        t = time.perf_counter()
        session.ground(vol, q + " (cold)")
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    session.ground(vol, QUERIES[0])  # tokens and text both cached
    cached = time.perf_counter() - t
    w, c = statistics.median(warm), statistics.median(cold)
    print(f"[1] text query -> heatmap, 256x256x24, encoded volume: median {w * 1000:.0f} ms over {len(warm)} new queries "
          f"(target <= 300 ms; repeated query {cached * 1000:.0f} ms)")
    print(f"    baseline, cold cache (encoder pass included): median {c * 1000:.0f} ms; ratio cold / encoded = {c / w:.1f}x")


def bench_encode(session, vol, repeats: int) -> None:
    import torch

    from decipher_mr.data.preprocess import preprocess_volume

    prepared, _ = preprocess_volume(vol, session.bundle.preprocess)
    x = torch.from_numpy(prepared)[None, None]
    bare, full, pre = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode(), session._autocast():
            session.vision(x, return_layers=session.layers)
        bare.append(time.perf_counter() - t)
        session.cache.clear()
        t = time.perf_counter()
        enc = session.encode(vol)
        full.append(time.perf_counter() - t)
        pre.append(full[-1] - enc.encode_seconds)
    b, f = statistics.median(bare), statistics.median(full)
    print(f"[4] encode 256x256x24 with the session: median {f:.2f} s (preprocessing and hashing {statistics.median(pre):.2f} s "
          f"of it); bare encoder on the prepared tensor {b:.2f} s; ratio session / encoder = {f / b:.2f}")


def bench_image_embedding(session, vol, repeats: int) -> None:
    view, dense = [], []
    for _ in range(repeats):
        session.clear_cache()
        t = time.perf_counter()
        first = session.image_embedding(vol)
        view.append(time.perf_counter() - t)
        session.clear_cache()
        t = time.perf_counter()
        enc = session.encode(vol)
        again = session.image_embedding(enc)
        dense.append(time.perf_counter() - t)
    assert float(first @ again) > 0.9999
    v, d = statistics.median(view), statistics.median(dense)
    print(f"[5] image embedding of a 256x256x24 volume not yet encoded: median {v * 1000:.0f} ms (the image view only)")
    print(f"    baseline, dense encoding first, then the view: median {d * 1000:.0f} ms; ratio = {d / v:.1f}x")


def bench_search(rows: int, dim: int, queries: int) -> None:
    from decipher_mr.index.ann import DEFAULT_NPROBE, AnnIndex, exact_search

    rng = np.random.default_rng(0)
    n_clusters = max(10, rows // 200)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    x = np.empty((rows, dim), np.float32)
    for s in range(0, rows, 100_000):
        e = min(rows, s + 100_000)
        chunk = centres[rng.integers(0, n_clusters, e - s)] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32)
        x[s:e] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    q = x[rng.choice(rows, queries, replace=False)] + 0.1 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t = time.perf_counter()
    ann = AnnIndex.train(x)
    t_train = time.perf_counter() - t
    ann.add(x, np.arange(rows))
    t_build = time.perf_counter() - t
    lat, found = [], []
    for i in range(queries):
        t = time.perf_counter()
        _, r = ann.search(q[i:i + 1], 10)
        lat.append(time.perf_counter() - t)
        found.append(r[0])
    exact_lat = []
    for i in range(min(10, queries)):
        t = time.perf_counter()
        exact_search(x, q[i:i + 1], 10)
        exact_lat.append(time.perf_counter() - t)
    _, truth = exact_search(x, q, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
    a, e = statistics.median(lat), statistics.median(exact_lat)
    print(f"[2] search {rows:,} x {dim}: IVF ({ann.nlist} cells, nprobe {DEFAULT_NPROBE}) top-10 median {a * 1000:.2f} ms, "
          f"recall@10 {recall:.3f} (targets <= 10 ms, >= 0.95); build {t_build:.0f} s (k-means {t_train:.0f} s)")
    print(f"    baseline, exact brute force: median {e * 1000:.1f} ms; ratio exact / IVF = {e / a:.0f}x")


def segment_memory_child(bundle: str) -> None:
    """Run in a fresh process: print JSON with the RSS after loading and the peak after segmenting."""
    import torch

    from decipher_mr.data.volume import Volume
    from decipher_mr.inference import Session

    torch.set_num_threads(2)
    s = Session.from_bundle(bundle, device="cpu")
    rng = np.random.default_rng(0)
    arr = rng.random((512, 512, 160), dtype=np.float32)
    vol = Volume(arr, (0.45, 0.45, 1.0))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    seg = s.segment(vol)
    seconds = time.perf_counter() - t
    assert seg.labels.same_geometry(vol)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    enc = s.encode(vol)
    print(json.dumps({"loaded": loaded, "peak": peak, "seconds": seconds, "grid": enc.grid, "windows": enc.windows}))


def bench_segment_memory(bundle: Path) -> None:
    proc = subprocess.run([sys.executable, __file__, "--segment-memory-child", str(bundle)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=900)
    if proc.returncode != 0:
        print(f"[3] segmentation memory: child failed: {proc.stderr[-800:]}")
        return
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = 1024 ** 3
    print(f"[3] segment 512x512x160 (1.5 mm model grid {'x'.join(map(str, r['grid']))} patches, {r['windows']} encoder "
          f"windows, {r['seconds']:.0f} s): peak memory {r['peak'] / gb:.2f} GB (target <= 6 GB)")
    print(f"    baseline, bundle + input volume loaded: {r['loaded'] / gb:.2f} GB; segmentation adds "
          f"{(r['peak'] - r['loaded']) / gb:.2f} GB; ratio peak / loaded = {r['peak'] / r['loaded']:.2f}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--segment-memory-child":
        segment_memory_child(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-small")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from decipher_mr.inference import Session

    with tempfile.TemporaryDirectory() as tmp:
        native = make_bundle(Path(tmp) / "native", args.preset, None)
        session = Session.from_bundle(native, device="cpu")
        vol = colin_slab()
        print(f"model {args.preset} + MiniLM text tower, {torch.get_num_threads()} CPU threads, precision {session.precision}")
        bench_text_query(session, vol, args.repeats)
        bench_encode(session, vol, max(1, args.repeats // 2))
        bench_image_embedding(session, vol, max(1, args.repeats // 2))
        del session
        bench_segment_memory(make_bundle(Path(tmp) / "iso", args.preset, (1.5, 1.5, 1.5)))
    bench_search(args.rows, 512, args.queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
