"""Stage-1 training throughput on CPU: volumes/s, model FLOPs utilisation, and whether the data
loader keeps up (loader-only volumes/s against the training step's consumption; target >= 3x).

Uses the demo config (DecipherMRTraining/configs/vit-small-demo.json: vit-tiny, 64x64x16 global and
4 x 32x32x8 local crops, batch 4) on a prepared cache; without --cache a small demo cache is built
first from real MRI (Colin27/MNI152) in a temporary folder.

    .venv/bin/python Testing/bench/bench_pretrain.py --cache demo/cache     # --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.models import vision_config
from decipher_mr.train.ssl.masking import BlockMaskConfig
from decipher_mr.train.ssl.meta_arch import HeadConfig, SSLMetaArch
from decipher_mr.train.ssl.multicrop import MultiCropConfig, MultiCropDataset, collate_multicrop
from decipher_mr.train.ssl.trainer import load_config

REPO = Path(__file__).resolve().parents[2]


def demo_cache(root: Path) -> Path:
    from decipher_mr.data.demo import build_demo_corpus
    from decipher_mr.data.prepare import prepare_manifest
    from decipher_mr.data.preprocess import PreprocessConfig

    manifest = build_demo_corpus(root / "demo", subjects=8, seed=0, progress=False)
    prepare_manifest(manifest, root / "cache", config=PreprocessConfig(target_spacing=(2.0, 2.0, 2.0)), progress=False)
    return root / "cache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache")
    ap.add_argument("--config", default=str(REPO / "DecipherMRTraining" / "configs" / "vit-small-demo.json"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.encoder=vit-small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    cache_dir = Path(args.cache) if args.cache else demo_cache(Path(tmp.name))
    cfg = load_config(args.config, [f"data.cache={cache_dir}", *args.overrides])
    mc, tc = cfg["model"], cfg["train"]
    enc_cfg = vision_config(mc["encoder"], **mc.get("encoder_overrides", {}))
    crops = MultiCropConfig.from_dict(cfg["crops"])
    cache = PreparedCache(cache_dir)
    ds = MultiCropDataset(cache, None, crops, BlockMaskConfig(), enc_cfg.patch_size, seed=0)
    b = tc["batch_size"]
    print(f"encoder={mc['encoder']} batch={b} global={crops.global_size} local={crops.n_local}x{crops.local_size} "
          f"threads={args.threads} items={len(ds)}")

    torch.manual_seed(0)
    heads = HeadConfig(mc["dino_prototypes"], mc["ibot_prototypes"], mc["head_hidden_dim"], mc["head_bottleneck_dim"], mc["head_layers"])
    arch = SSLMetaArch(enc_cfg, heads, cfg["loss"])
    opt = torch.optim.AdamW(arch.param_groups(layer_decay=0.9, patch_embed_lr_mult=0.2), lr=1e-4)  # the trainer's groups

    def make_batch(s: int):
        return collate_multicrop([ds[((s * b + i) % len(ds), s * b + i)] for i in range(b)])

    def step(batch):
        loss, _ = arch.training_loss(batch, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        arch.update_teacher(0.996)

    for i in range(len(ds)):  # warm-up: page the cache in, as after the first epoch
        ds[(i, 10**9 + i)]
    step(make_batch(0))
    # Loader and step are timed alternately, so that load from other processes hits both alike.
    t_data = t_step = 0.0
    for s in range(args.steps):
        t0 = time.perf_counter()
        batch = make_batch(s)
        t1 = time.perf_counter()
        step(batch)
        t_data += t1 - t0
        t_step += time.perf_counter() - t1
    t_data /= args.steps
    t_step /= args.steps

    enc = arch.student.backbone
    fwd_student = 2 * b * enc.flops(crops.global_size) + crops.n_local * b * enc.flops(crops.local_size)
    fwd_teacher = 2 * b * enc.flops(crops.global_size)
    step_flops = 3 * fwd_student + fwd_teacher  # backward ~ 2x forward; heads not counted
    a, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ w
    t0 = time.perf_counter()
    for _ in range(3):
        a @ w
    peak = 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9

    print(f"training step   {t_step:7.3f} s/step  {b / t_step:7.2f} volumes/s  "
          f"{step_flops / t_step / 1e9:6.1f} GFLOP/s = MFU {step_flops / t_step / 1e9 / peak:5.1%} of fp32 GEMM peak {peak:.0f} GFLOP/s")
    print(f"data loader     {t_data:7.3f} s/batch {b / t_data:7.2f} volumes/s (one process)")
    print(f"loader / step consumption = {t_step / t_data:.1f}x (target >= 3x; num_workers=N multiplies the loader side)")


if __name__ == "__main__":
    main()
