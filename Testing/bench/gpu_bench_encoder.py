"""The encoder part of ``gpu_bench.py``: timing on the device (CUDA events), the bf16 GEMM peak, and the
encoder latency against a baseline ViT of the same size. The baseline is MONAI's ``ViT`` when monai
imports; it is not on the GPU machine, so then it is ``RefViT``, MONAI's ``ViT`` in plain PyTorch with the same parameter layout and the same attention
arithmetic (einsum + softmax, no SDPA). ``Testing/python/test_gpu_bench.py`` checks that it computes what
MONAI's ``ViT`` computes on the same weights.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GOAL_ENCODER_SPEEDUP = 3.0


class _RefAttention(nn.Module):
    """MONAI's ``SABlock`` arithmetic: one qkv Linear (no bias), einsum scores, softmax, einsum (no SDPA)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = (torch.einsum("blxd,blyd->blxy", q, k) * self.scale).softmax(dim=-1)
        o = torch.einsum("bhxy,bhyd->bhxd", att, v)
        return self.out_proj(o.permute(0, 2, 1, 3).reshape(B, N, D))


class _RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class _RefBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, heads: int):
        super().__init__()
        self.mlp = _RefMlp(dim, mlp_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _RefAttention(dim, heads)
        self.norm_cross_attn = nn.LayerNorm(dim)  # present (unused) in MONAI's TransformerBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _RefPatchEmbedding(nn.Module):
    def __init__(self, in_ch: int, dim: int, img_size, patch):
        super().__init__()
        n = math.prod(s // p for s, p in zip(img_size, patch))
        self.patch_embeddings = nn.Conv3d(in_ch, dim, kernel_size=patch, stride=patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(x).flatten(2).transpose(-1, -2) + self.position_embeddings


class RefViT(nn.Module):
    """MONAI ``ViT(classification=False, proj_type="conv", qkv_bias=False)`` in plain PyTorch: the same
    parameter names and shapes (its state dict loads), the same arithmetic; returns ``(x, hidden_states)``."""

    def __init__(self, in_channels: int, img_size, patch_size, hidden_size: int, mlp_dim: int, num_layers: int,
                 num_heads: int):
        super().__init__()
        self.patch_embedding = _RefPatchEmbedding(in_channels, hidden_size, img_size, patch_size)
        self.blocks = nn.ModuleList(_RefBlock(hidden_size, mlp_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor):
        x = self.patch_embedding(x)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden


def baseline_vit(size, enc_cfg, prefer_monai: bool = True) -> tuple[nn.Module, str, str | None]:
    """MONAI's ViT of the encoder's size if monai imports, else RefViT; returns (model, name, why-not-monai)."""
    kw = dict(in_channels=1, img_size=tuple(size), patch_size=tuple(enc_cfg.patch_size), hidden_size=enc_cfg.embed_dim,
              mlp_dim=enc_cfg.mlp_dim, num_layers=enc_cfg.depth, num_heads=enc_cfg.num_heads)
    why = "not tried (--no-monai)"
    if prefer_monai:
        try:
            import monai
            from monai.networks.nets import ViT

            return ViT(classification=False, **kw), f"monai.networks.nets.ViT (monai {monai.__version__})", None
        except Exception as exc:  # not installed on the GPU machine
            why = f"{type(exc).__name__}: {exc}"
    return RefViT(**kw), "RefViT: plain-PyTorch MONAI ViT (einsum attention, SDPA off)", why


# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, reps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def bf16_gemm_peak(device: torch.device, n: int, reps: int) -> dict[str, Any]:
    """TFLOP/s of an n x n x n bf16 matrix product (mean of ``reps`` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = time_calls(lambda: a @ b, reps, 3, device)
    mean = statistics.fmean(times)
    return {"tflops": 2 * n**3 / mean / 1e12, "n": n, "reps": reps, "mean_ms": mean * 1e3}


def encoder_latency(cfg: dict[str, Any], device: torch.device, prefer_monai: bool) -> dict[str, Any]:
    from decipher_mr.models.vit3d import build_vision_encoder, precision_context

    size = tuple(cfg["enc_size"])
    torch.manual_seed(0)
    ours = build_vision_encoder(cfg["enc_preset"]).to(device).eval()
    base, base_name, why = baseline_vit(size, ours.config, prefer_monai)
    base = base.to(device).eval()
    x = torch.randn(1, 1, *size, device=device)
    res: dict[str, Any] = {"input": [1, 1, *size], "encoder": cfg["enc_preset"], "baseline": base_name,
                           "monai_available": why is None, "monai_missing_reason": why,
                           "params_ours_m": sum(p.numel() for p in ours.parameters()) / 1e6,
                           "params_baseline_m": sum(p.numel() for p in base.parameters()) / 1e6,
                           "gflop": ours.flops(size) / 1e9, "reps": cfg["enc_reps"], "tf32": torch.backends.cuda.matmul.allow_tf32}
    with torch.inference_mode():
        # Each model in its own block, after its own warm-up (see bench_encoder.py).
        for label, model in (("ours", ours), ("baseline", base)):
            for prec in ("fp32", "bf16"):
                with precision_context(device, prec):
                    t = time_calls(lambda: model(x), cfg["enc_reps"], cfg["enc_warmup"], device)
                res[f"{label}_{prec}_ms"] = statistics.median(t) * 1e3
        ref = ours(x).patch_tokens.float()
        with precision_context(device, "bf16"):
            low = ours(x).patch_tokens.float()
    res["cosine_ours_bf16_fp32"] = F.cosine_similarity(low.flatten(), ref.flatten(), dim=0).item()
    res["speedup_bf16"] = res["baseline_bf16_ms"] / res["ours_bf16_ms"]
    res["speedup_ours_bf16_vs_baseline_fp32"] = res["baseline_fp32_ms"] / res["ours_bf16_ms"]
    res["speedup_fp32"] = res["baseline_fp32_ms"] / res["ours_fp32_ms"]
    res["goal_speedup_bf16"] = GOAL_ENCODER_SPEEDUP
    res["meets_goal"] = res["speedup_bf16"] >= GOAL_ENCODER_SPEEDUP
    res["tflops_ours_bf16"] = ours.flops(size) / (res["ours_bf16_ms"] / 1e3) / 1e12
    return res
