"""What one GPU needs for stage-1 pretraining at the paper's scale, measured without a GPU.

The model runs on PyTorch's ``meta`` device: every tensor has its real shape and dtype but no data, so
ViT-B with 65,536-prototype heads, 2 global 256x256x24 and 8 local 128x128x16 crops per sample, costs no
memory and seconds of time. A saved-tensors hook adds up what autograd keeps for backward (the
activations), per sample; parameters, gradients, AdamW's two moments and the teacher are counted from
the parameter list. fp32 throughout (meta tensors cannot enter CUDA's bf16 autocast): under bf16 autocast
most saved activations are half that size, so the bf16 batch is bounded by the fp32 figure from below.

  python Testing/bench/memory_estimate.py [--config DecipherMRTraining/configs/vit-base.json] [--gpu-gb 80]

It prints the bytes per part and the largest per-GPU batch that fits, with a stated reserve for the
transient peak (one checkpointed block recomputed in backward, the teacher's forward, allocator slack).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DecipherMRTraining"))

from decipher_mr.models.vit3d import vision_config  # noqa: E402
from decipher_mr.train.ssl.meta_arch import HeadConfig, SSLMetaArch  # noqa: E402
from decipher_mr.train.ssl.trainer import load_config  # noqa: E402


class _NoAutocastOnMeta(torch.autocast):
    """``torch.autocast`` refuses the meta device; the loss code only uses it to turn autocast off."""

    def __init__(self, device_type, *args, **kwargs):
        self._meta = device_type == "meta"
        if not self._meta:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return None if self._meta else super().__enter__()

    def __exit__(self, *exc):
        return None if self._meta else super().__exit__(*exc)


def saved_bytes_per_sample(arch: SSLMetaArch, cfg: dict, mask_fraction: float) -> tuple[int, int]:
    """(bytes autograd keeps for backward, masked tokens) for one sample on the meta device."""
    crops = cfg["crops"]
    g_size, l_size, n_local = tuple(crops["global_size"]), tuple(crops["local_size"]), int(crops["n_local"])
    patch = arch.encoder_cfg.patch_size if hasattr(arch.encoder_cfg, "patch_size") else 8
    p = patch if isinstance(patch, int) else patch[0]
    n_tokens = (g_size[0] // p) * (g_size[1] // p) * (g_size[2] // p)
    b = 1
    masked = int(round(2 * b * n_tokens * mask_fraction))
    batch = {
        "global": torch.empty(2 * b, 1, *g_size, device="meta"),
        "local": torch.empty(n_local * b, 1, *l_size, device="meta"),
        "masks": torch.empty(2 * b, n_tokens, dtype=torch.bool, device="meta"),
        "mask_indices": torch.empty(masked, dtype=torch.long, device="meta"),
        "mask_weights": torch.empty(masked, device="meta"),
    }
    seen: dict[int, int] = {}
    params = {id(t) for t in arch.parameters()}

    def pack(t):
        if id(t) not in params:  # weights are counted once, below
            seen[id(t)] = t.numel() * t.element_size()
        return t

    real_autocast, torch.autocast = torch.autocast, _NoAutocastOnMeta
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            arch.training_loss(batch, teacher_temp=0.04)
    finally:
        torch.autocast = real_autocast
    return sum(seen.values()), masked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "DecipherMRTraining/configs/vit-base.json"))
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--mask-fraction", type=float, default=0.15,
                    help="masked share of a sample's global-crop patches (p=0.5 of crops x mean ratio 0.3)")
    ap.add_argument("--reserve-gb", type=float, default=12.0,
                    help="transient peak, CUDA context and allocator slack kept free")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    mc = cfg["model"]
    enc = vision_config(mc["encoder"], **mc.get("encoder_overrides", {}))
    heads = HeadConfig(mc["dino_prototypes"], mc["ibot_prototypes"], mc["head_hidden_dim"], mc["head_bottleneck_dim"], mc["head_layers"])
    arch = SSLMetaArch(enc, heads, cfg["loss"]).to("meta")  # built on the CPU (about 1 GB), then emptied
    arch.train()
    n_student = sum(p.numel() for p in arch.student.parameters())
    n_teacher = sum(p.numel() for p in arch.teacher.parameters())
    # fp32 weights + grads + AdamW m and v for the student; fp32 weights for the teacher
    static = 4 * (4 * n_student + n_teacher)
    act, masked = saved_bytes_per_sample(arch, cfg, args.mask_fraction)
    free = args.gpu_gb * 1e9 - static - args.reserve_gb * 1e9
    per_gpu = int(free // act)
    print(f"config {args.config}: encoder {mc['encoder']} (checkpointing {enc.activation_checkpointing}), "
          f"prototypes {mc['dino_prototypes']}/{mc['ibot_prototypes']}, iBOT chunk rows {cfg['loss'].get('ibot_chunk_rows')}")
    print(f"parameters: student {n_student / 1e6:.1f} M, teacher {n_teacher / 1e6:.1f} M -> "
          f"weights, grads, AdamW, teacher: {static / 1e9:.2f} GB")
    print(f"activations kept for backward: {act / 1e9:.3f} GB per sample (fp32; {masked} masked tokens)")
    print(f"largest per-GPU batch on {args.gpu_gb:g} GB with {args.reserve_gb:g} GB reserve: {per_gpu} (fp32 bound; "
          f"bf16 autocast keeps about half the activations)")
    print(f"the config's global batch {cfg['train']['batch_size']} needs at least "
          f"{-(-cfg['train']['batch_size'] // max(per_gpu, 1))} such GPU(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
