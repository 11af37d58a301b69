"""Benchmark: why heads train on cached frozen features.

On real anatomy (Colin27 T1, resampled to 2 mm and cropped to the brain), times one training step of
a task head three ways, in the same run:

* **cached**: the head alone on features computed once (what ``train-head`` does when frozen);
* **encoder in the loop** (the baseline): the frozen encoder's forward pass every step, then the head;
* for segmentation also **SegResNet from scratch** (MONAI), the usual alternative.

It prints ms per step of each and the ratios baseline / cached, for a probe and for the
segmentation decoder. Run with a preset that fits the machine:

    .venv/bin/python Testing/bench/bench_heads.py [--preset vit-tiny] [--crop 64 80 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def colin_view(crop) -> torch.Tensor:
    from decipher_mr.assets import colin27_t1
    from decipher_mr.heads.dense import centre_view

    arr = np.asarray(nib.load(str(colin27_t1("ch2bet"))).dataobj, dtype=np.float32)[::2, ::2, ::2]
    idx = np.argwhere(arr > 0)
    arr = arr[tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))]
    arr = arr / arr.max()
    return torch.from_numpy(centre_view(arr, crop)[0])[None, None]


def timed(step, steps: int) -> float:
    step()  # warm-up (allocations, oneDNN primitive caches)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-tiny")
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 80, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()

    from monai.networks.nets import SegResNet

    from decipher_mr.heads import build_head
    from decipher_mr.heads.segmentation import default_layers
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(0)
    x = colin_view(args.crop)
    encoder = build_vision_encoder(args.preset).eval().requires_grad_(False)
    d, depth = encoder.config.embed_dim, len(encoder.blocks)
    layers = default_layers(depth)
    probe = build_head("classify", {"embed_dim": d, "labels": ["a", "b", "c"]})
    seg = build_head("segment", {"embed_dim": d, "labels": ["bg", "a", "b", "c"], "layers": layers, "channels": args.channels})
    target = torch.randint(0, 4, x.shape[2:])[None]
    with torch.no_grad():
        cached = encoder(x, return_layers=layers)

    def probe_step(out_fn):
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(probe.raw(out_fn()), torch.tensor([1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def seg_step(out_fn):
        opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(seg(out_fn(), image=x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def live():
        with torch.no_grad():
            return encoder(x, return_layers=layers)

    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=4, init_filters=args.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def segresnet_step():
        loss = F.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    print(f"encoder {args.preset} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M params), view {args.crop}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    p_cached = timed(probe_step(lambda: cached), args.steps)
    p_live = timed(probe_step(live), args.steps)
    print(f"probe step: cached features {p_cached:.1f} ms | encoder in the loop (baseline) {p_live:.1f} ms | "
          f"ratio baseline/cached {p_live / p_cached:.1f}x")
    s_cached = timed(seg_step(lambda: cached), args.steps)
    s_live = timed(seg_step(live), args.steps)
    s_scratch = timed(segresnet_step, args.steps)
    print(f"segmentation step: cached features {s_cached:.1f} ms | encoder in the loop (baseline) {s_live:.1f} ms | "
          f"SegResNet from scratch {s_scratch:.1f} ms")
    print(f"ratios: baseline/cached {s_live / s_cached:.2f}x, SegResNet/cached {s_scratch / s_cached:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
