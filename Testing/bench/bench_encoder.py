"""Forward latency of the ViT-B encoder on one 256x256x24 volume, against MONAI's ViT of the same size.

Prints, in one run on this machine (2 threads by default): the fp32 and bf16 matmul peaks (large GEMM),
our encoder in fp32 and bf16 autocast, MONAI's ``ViT`` in fp32, the speed-up ratio, the bf16-vs-fp32
cosine similarity, and achieved GFLOP/s as a fraction of the peak (FLOPs counted analytically).

On a CPU without native bf16 (AVX2 only: no AVX512-BF16/AMX) oneDNN emulates bf16 and it is far
slower than fp32; the script says so, and then times bf16 on a smaller input unless --force-bf16.

    .venv/bin/python Testing/bench/bench_encoder.py            # --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from decipher_mr.models import bf16_is_fast, build_vision_encoder, precision_context


def timed(fn, reps: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive creation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, budget_s: float = 2.0) -> tuple[float, int]:
    """GFLOP/s of a square GEMM, sized so one product takes about ``budget_s`` at most."""
    n = 512
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = timed(lambda: a @ b, 2)
        if n >= 4096 or t * 8 > budget_s:
            return 2 * n**3 / t / 1e9, n
        n *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=3, default=(256, 256, 24))
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 on the full input even if emulated")
    ap.add_argument("--skip-monai", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    native = bf16_is_fast("cpu")
    print(f"threads={args.threads} input=1x1x{size} cpu={torch.backends.cpu.get_cpu_capability()} native_bf16={native}")

    peak32, n32 = gemm_peak(torch.float32)
    peak16, n16 = gemm_peak(torch.bfloat16)
    print(f"GEMM peak  fp32 {peak32:8.1f} GFLOP/s (n={n32})   bf16 {peak16:8.1f} GFLOP/s (n={n16})")

    torch.manual_seed(0)
    enc = build_vision_encoder("vit-base").eval()
    x = torch.randn(1, 1, *size)
    flops = enc.flops(size)
    monai_vit = None
    if not args.skip_monai:
        from monai.networks.nets import ViT

        torch.manual_seed(0)
        monai_vit = ViT(in_channels=1, img_size=size, patch_size=(8, 8, 8), hidden_size=768, mlp_dim=3072,
                        num_layers=12, num_heads=12, classification=False).eval()

    # Each model is timed in its own block after a warm-up. (Alternating them per repetition makes
    # ours pay page faults for the memory MONAI's unfused attention just released: ~2x slower.)
    def reps(model) -> list[float]:
        model(x)
        out = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - t0)
        return out

    with torch.inference_mode():
        t_ours = reps(enc)
        ref = enc(x).patch_tokens.float()
        t_monai = reps(monai_vit) if monai_vit is not None else []
    t32 = statistics.median(t_ours)
    peak32 = max(peak32, gemm_peak(torch.float32)[0])  # the better of before and after
    print(f"ours fp32        {t32:8.2f} s   {flops / t32 / 1e9:7.1f} GFLOP/s = {flops / t32 / 1e9 / peak32:5.1%} of fp32 peak"
          f"   ({flops / 1e9:.0f} GFLOP)")

    bf16_size = size if (native or args.force_bf16) else (64, 64, 24)
    xb = x if bf16_size == size else torch.randn(1, 1, *bf16_size)
    with torch.inference_mode(), precision_context("cpu", "bf16"):
        t16 = timed(lambda: enc(xb), args.reps if bf16_size == size else 1)
        low = enc(xb).patch_tokens.float()
    with torch.inference_mode():
        ref_b = ref if bf16_size == size else enc(xb).patch_tokens.float()
    cos = F.cosine_similarity(low.flatten(), ref_b.flatten(), dim=0).item()
    fb = enc.flops(bf16_size)
    note = "" if bf16_size == size else f"  [emulated bf16: timed on 1x1x{bf16_size} instead]"
    frac = f" = {fb / t16 / 1e9 / peak16:5.1%} of bf16 peak" if native else ""
    print(f"ours bf16        {t16:8.2f} s   {fb / t16 / 1e9:7.1f} GFLOP/s{frac}"
          f"   cosine(bf16, fp32) = {cos:.5f}{note}")

    if monai_vit is not None:
        tm = statistics.median(t_monai)
        print(f"MONAI ViT fp32   {tm:8.2f} s   {flops / tm / 1e9:7.1f} GFLOP/s")
        best = min(t32, t16) if bf16_size == size else t32
        label = "best of ours" if bf16_size == size else "ours fp32 (precision=auto on this CPU)"
        print(f"speed-up vs MONAI: {label} {tm / best:.2f}x" + (f", bf16 {tm / t16:.2f}x" if bf16_size == size else ""))
        print(f"per-repetition seconds: ours {[round(t, 2) for t in t_ours]}  MONAI {[round(t, 2) for t in t_monai]}")


if __name__ == "__main__":
    main()
