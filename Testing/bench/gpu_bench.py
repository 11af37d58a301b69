"""GPU benchmark (issue 13, "Measured"): stage-1 MFU, stage-2 step time and encoder latency on one GPU.

One run on one GPU (H100/H200), in under 8 minutes, with a random-weight ViT-B:

1. **Stage 1** in a child started by ``torchrun --nproc_per_node=1`` (``python -m torch.distributed.run``)
   with a real NCCL process group (made by this script: with ``WORLD_SIZE=1`` the trainer's
   ``init_distributed`` makes none, so a plain single-process run would never touch NCCL). The student is
   wrapped in DDP as the trainer does for several ranks, and each step is the trainer's step (bf16
   autocast, ``SSLMetaArch.training_loss``, per-part clipping, AdamW, EMA teacher, ``fetch_metrics``).
   Reported: volumes/s and MFU against the GPU's bf16 peak **measured in the same process** (an
   8192^3 bf16 GEMM timed with CUDA events). Then the real ``train()`` runs a few iterations of the demo
   config (vit-tiny) inside the same NCCL group: DataLoader, collectives, checkpoint, barrier, export.
2. **Stage 2** in the same child, same group: ``clip_step`` (GradCache chunks), ``average_gradients``,
   clipping, AdamW, ``all_reduce_mean`` on ViT-B 256x256x24 views, and a MiniLM-shaped BERT (6 layers,
   384-d, random weights; the packaged MiniLM is not on the GPU machine) with its last 2 blocks trained.
3. **Encoder latency** in the parent (after the child has exited): ViT-B on one 256x256x24 volume,
   fp32 and bf16, against a baseline ViT of the same size in the same run: MONAI's ``ViT`` when
   ``monai`` imports, else ``RefViT`` (``gpu_bench_encoder.py``) -- plain PyTorch with MONAI's parameter layout and MONAI's
   attention arithmetic (einsum + softmax, no SDPA); ``Testing/python/test_gpu_bench.py`` checks that
   it computes exactly what MONAI's ``ViT`` computes on the same weights.

Data: the real demo corpus needs SimpleITK/nibabel/nilearn and the MRI template packages, none of
which are on the GPU machine, so the script writes a small prepared cache itself (``index.jsonl`` +
``items/*.npy``, the format ``decipher-mr prepare`` writes; ``gpu_bench_data.py``) of synthetic head-like volumes (ellipsoidal
skull/CSF/grey/white-matter shells, smooth bias field, Rician-like noise, z-scored), 256x256x32 at
0.9x0.9x5 mm, with short reports for stage 2; ``--cache DIR`` uses a real prepared cache instead.

Goals printed next to the figures: stage 1 at >= 40 % MFU; encoder >= 3x the baseline in bf16.
Figures go to ``$OUT/gpu_bench.json`` (or ``--out``) and a table is printed. Exit status 1 if a
part crashed (figures below a goal do not fail the run).

    bash Testing/bench/gpu_bench.sh                              # on the GPU machine
    .venv/bin/python Testing/bench/gpu_bench.py --cpu-smoke      # seconds, CPU, gloo: figures meaningless

Imports only torch, numpy, safetensors, transformers (tokenizer + BERT) and ``decipher_mr``, none of whose
modules used here import monai, SimpleITK, nibabel or faiss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DecipherMRTraining"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench_data import build_synthetic_cache, write_tokenizer_folder  # noqa: E402
from gpu_bench_encoder import (GOAL_ENCODER_SPEEDUP, RefViT, bf16_gemm_peak, encoder_latency,  # noqa: E402,F401
                               sync, time_calls)
from gpu_bench_table import print_table  # noqa: E402

GOAL_MFU = 0.40
RESULT_NAME = "gpu_bench.json"

# Settings per mode. "gpu": the paper's ViT-B stage-1 crops, align-base's view; "cpu": tiny, seconds.
MODES: dict[str, dict[str, Any]] = {
    "gpu": {
        "cache_items": 16, "cache_shape": (256, 256, 32), "cache_spacing": (0.9, 0.9, 5.0),
        "s1_encoder": "vit-base", "s1_prototypes": 65536, "s1_head_hidden": 2048, "s1_bottleneck": 256,
        "s1_global": (256, 256, 24), "s1_local": (128, 128, 16), "s1_n_local": 8, "s1_batch": 8,
        "s1_warmup": 3, "s1_steps": 20, "s1_workers": 8,
        "s2_encoder": "vit-base", "s2_size": (256, 256, 24), "s2_batch": 32, "s2_chunks": 4,
        "s2_text": {"hidden": 384, "layers": 6, "heads": 12}, "s2_text_trainable": 2, "s2_warmup": 1, "s2_steps": 5,
        "enc_preset": "vit-base", "enc_size": (256, 256, 24), "enc_reps": 20, "enc_warmup": 3,
        "gemm_n": 8192, "gemm_reps": 10, "trainer_iterations": 3, "align_iterations": 2,
    },
    "cpu": {
        "cache_items": 6, "cache_shape": (48, 48, 16), "cache_spacing": (2.0, 2.0, 4.0),
        "s1_encoder": "vit-micro", "s1_prototypes": 64, "s1_head_hidden": 64, "s1_bottleneck": 32,
        "s1_global": (32, 32, 16), "s1_local": (16, 16, 8), "s1_n_local": 2, "s1_batch": 2,
        "s1_warmup": 1, "s1_steps": 2, "s1_workers": 0,
        "s2_encoder": "vit-micro", "s2_size": (32, 32, 16), "s2_batch": 4, "s2_chunks": 2,
        "s2_text": {"hidden": 32, "layers": 2, "heads": 2}, "s2_text_trainable": 1, "s2_warmup": 1, "s2_steps": 1,
        "enc_preset": "vit-micro", "enc_size": (32, 32, 16), "enc_reps": 2, "enc_warmup": 1,
        "gemm_n": 256, "gemm_reps": 2, "trainer_iterations": 2, "align_iterations": 2,
    },
}

BLOCKED_ON_GPU_MACHINE = ("monai", "SimpleITK", "nibabel", "faiss")


# ---------------------------------------------------------------------------------------------
# the torchrun child: stage 1 and stage 2 inside a real process group

class _OneSample:
    """collate_fn of a batch_size=1 loader over (item, key) pairs: the dataset's sample itself (picklable)."""

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, keys):
        return self.ds[keys[0]]


def head_flops(heads, embed_dim: int, n: int) -> float:
    dims = [embed_dim] + [heads.hidden_dim] * (heads.layers - 1) + [heads.bottleneck_dim]
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + heads.bottleneck_dim * heads.dino_prototypes
    return 2.0 * n * macs


def stage1(cfg: dict[str, Any], cache_dir: Path, device: torch.device, peak_tflops: float) -> dict[str, Any]:
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.models.vit3d import precision_context, resolve_precision, vision_config
    from decipher_mr.train.runtime import fetch_metrics
    from decipher_mr.train.ssl.masking import BlockMaskConfig
    from decipher_mr.train.ssl.meta_arch import HeadConfig, SSLMetaArch
    from decipher_mr.train.ssl.multicrop import MultiCropConfig, MultiCropDataset, collate_multicrop

    import torch.distributed as dist

    b = cfg["s1_batch"]
    crops = MultiCropConfig(global_size=cfg["s1_global"], local_size=cfg["s1_local"], n_local=cfg["s1_n_local"])
    enc_cfg = vision_config(cfg["s1_encoder"], drop_path_rate=0.1 if cfg["s1_encoder"] == "vit-base" else 0.0)
    ds = MultiCropDataset(PreparedCache(cache_dir), None, crops, BlockMaskConfig(), enc_cfg.patch_size, seed=0)
    # Loader throughput: samples (each 2 global + n_local crops, masks) from ``workers`` processes, timed
    # from the iterator's creation to the last of 3 per worker (worker start-up included: conservative).
    workers = min(cfg["s1_workers"], max(0, (os.cpu_count() or 2) - 2))
    n_samples = max(2 * b, 3 * max(workers, 1))
    keys = [(i % len(ds), i) for i in range(n_samples)]
    loader = torch.utils.data.DataLoader(keys, batch_size=1, num_workers=workers, collate_fn=_OneSample(ds),
                                         prefetch_factor=2 if workers else None)
    t0 = time.perf_counter()
    samples = list(loader)
    loader_s = (time.perf_counter() - t0) / n_samples  # seconds per sample
    del loader
    batches = [{k: v.to(device, non_blocking=True) for k, v in collate_multicrop(samples[i * b:(i + 1) * b]).items()}
               for i in range(2)]
    del samples

    torch.manual_seed(0)
    heads = HeadConfig(cfg["s1_prototypes"], cfg["s1_prototypes"], cfg["s1_head_hidden"], cfg["s1_bottleneck"], 3)
    arch = SSLMetaArch(enc_cfg, heads, {"center_momentum": 0.9}).to(device)
    ddp = dist.is_initialized()
    if ddp:  # as the trainer does under torchrun with several ranks
        arch.student_runner = torch.nn.parallel.DistributedDataParallel(
            arch.student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = torch.optim.AdamW(arch.param_groups(0.9, 0.2), lr=1e-4, betas=(0.9, 0.999))
    arch.train()
    arch.teacher.eval()
    losses: list[float] = []
    precision = resolve_precision(device, "auto")  # the trainer's default: bf16 on a GPU, fp32 on an AVX2 CPU

    def step(batch):
        with precision_context(device, precision):
            loss, metrics = arch.training_loss(batch, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        arch.clip_gradients(3.0)
        opt.step()
        arch.update_teacher(0.996)
        losses.append(fetch_metrics({"loss": loss.detach(), **metrics})["loss"])  # the trainer's one sync

    n = 0

    def next_step():
        nonlocal n
        step(batches[n % len(batches)])
        n += 1

    for _ in range(cfg["s1_warmup"]):
        next_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(cfg["s1_steps"]):
        next_step()
    sync(device)
    step_s = (time.perf_counter() - t0) / cfg["s1_steps"]

    enc = arch.student.backbone
    d = enc_cfg.embed_dim
    n_masked = statistics.fmean(float(bt["masks"].sum()) for bt in batches)
    student = (enc.flops(crops.global_size, 2 * b) + enc.flops(crops.local_size, crops.n_local * b)
               + head_flops(heads, d, (2 + crops.n_local) * b) + head_flops(heads, d, n_masked))
    teacher = enc.flops(crops.global_size, 2 * b) + head_flops(heads, d, 2 * b) + head_flops(heads, d, n_masked)
    step_flops = 3 * student + teacher  # backward ~ 2x forward
    tflops = step_flops / step_s / 1e12
    return {
        "encoder": cfg["s1_encoder"], "batch_per_gpu": b, "global_size": list(crops.global_size),
        "local_size": list(crops.local_size), "n_local": crops.n_local, "precision": precision, "ddp": ddp,
        "prototypes": heads.dino_prototypes, "steps_timed": cfg["s1_steps"], "step_s": step_s,
        "volumes_per_s": b / step_s, "images_per_s": b / step_s, "step_tflop": step_flops / 1e12, "tflops": tflops,
        "mfu": tflops / peak_tflops, "goal_mfu": GOAL_MFU, "meets_goal": tflops / peak_tflops >= GOAL_MFU,
        "flops_counted": "encoder (analytic, attention included) + DINO/iBOT heads; backward = 2x forward",
        "loader_volumes_per_s": 1 / loader_s, "loader_workers": workers,
        "loader_keeps_up": (1 / loader_s) >= (b / step_s),
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses, "finite": all(math.isfinite(x) for x in losses),
    }


def stage1_fitting(cfg: dict[str, Any], cache_dir: Path, device: torch.device, peak_tflops: float) -> dict[str, Any]:
    """stage1 at the mode's batch; on a CUDA out-of-memory error, again at half the batch (once)."""
    try:
        return stage1(cfg, cache_dir, device, peak_tflops)
    except torch.cuda.OutOfMemoryError as exc:
        if device.type != "cuda" or cfg["s1_batch"] < 2:
            raise
        print(f"stage 1: out of memory at batch {cfg['s1_batch']} ({exc}); retrying at {cfg['s1_batch'] // 2}", flush=True)
        torch.cuda.empty_cache()
        res = stage1({**cfg, "s1_batch": cfg["s1_batch"] // 2}, cache_dir, device, peak_tflops)
        res["oom_at_batch"] = cfg["s1_batch"]
        return res


def stage2(cfg: dict[str, Any], cache_dir: Path, device: torch.device, tok_dir: Path) -> dict[str, Any]:
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.models.clip import ImageTextModel, tower_is_frozen
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder, precision_context
    from decipher_mr.train.align import TextSide, average_gradients, clip_step, image_batch, param_groups
    from decipher_mr.train.clip_loss import ClipLoss
    from decipher_mr.train.distributed import all_reduce_mean

    cache = PreparedCache(cache_dir)
    b, chunks = cfg["s2_batch"], cfg["s2_chunks"]
    torch.manual_seed(0)
    text_spec = {"path": str(tok_dir), "tiny": True, **cfg["s2_text"]}
    model = ImageTextModel(build_vision_encoder(cfg["s2_encoder"]), TextTower.from_spec(text_spec)).to(device)
    model.set_trainable("all", cfg["s2_text_trainable"])
    idx = [i % len(cache) for i in range(b)]
    text = TextSide(model, [cache.items[i].report or "" for i in range(len(cache))], device,
                    precompute=tower_is_frozen(model.text))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    model.train()
    model.set_frozen_towers_eval()
    loss_fn = ClipLoss()
    view = {"size": list(cfg["s2_size"]), "mode": "crop", "augment": True}
    images = [image_batch(cache, idx, view, np.random.default_rng(s)).to(device) for s in range(2)]
    res: dict[str, Any] = {
        "encoder": cfg["s2_encoder"], "image_size": list(cfg["s2_size"]), "batch_per_gpu": b, "chunks": chunks,
        "text": f"random BERT {cfg['s2_text']} (MiniLM-shaped on GPU), last {cfg['s2_text_trainable']} block(s) trained",
        "text_precomputed": text.pooled is not None, "steps_timed": cfg["s2_steps"], "losses": []}
    # fp32 is what train_align runs (it has no autocast); bf16 autocast is timed for comparison.
    for prec in ("fp32", "bf16"):
        n = 0

        def step():
            nonlocal n
            opt.zero_grad(set_to_none=True)
            with precision_context(device, prec):
                loss, _, _ = clip_step(model, loss_fn, images[n % 2], text, idx, chunks)
            average_gradients(model)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            model.clamp_logit_scale_()
            res["losses"].append(float(all_reduce_mean(loss.clone())))
            n += 1

        for _ in range(cfg["s2_warmup"]):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg["s2_steps"]):
            step()
        sync(device)
        step_s = (time.perf_counter() - t0) / cfg["s2_steps"]
        res[f"step_s_{prec}"] = step_s
        res[f"pairs_per_s_{prec}"] = b / step_s
    res["step_s"], res["pairs_per_s"] = res["step_s_fp32"], res["pairs_per_s_fp32"]
    res["step_precision"] = "fp32, as train_align runs (no autocast there); step_s_bf16 = the same step under bf16 autocast"
    res["finite"] = all(math.isfinite(x) for x in res["losses"])
    return res


def trainer_smoke(cfg: dict[str, Any], cache_dir: Path, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """The real stage-1 ``train()`` (demo config, vit-tiny) for a few iterations inside the process group."""
    from decipher_mr.train.ssl.trainer import load_config, train

    crops = (["crops.global_size=[64,64,16]", "crops.local_size=[32,32,8]", "crops.n_local=4"] if device.type == "cuda"
             else ["crops.global_size=[32,32,16]", "crops.local_size=[16,16,8]", "crops.n_local=2",
                   "model.encoder=vit-micro", "train.batch_size=2"])
    conf = load_config(REPO / "DecipherMRTraining" / "configs" / "vit-small-demo.json", [
        f"data.cache={cache_dir}", f"run_dir={run_dir}", f"device={device.type}", "data.num_workers=0",
        f"train.iterations={cfg['trainer_iterations']}", "train.checkpoint_every=1", "train.progress=false",
        "train.tensorboard=false", "train.monitor_every=1", *crops])
    summary = train(conf)
    return {"ok": True, "world_size_seen_by_trainer": summary["world_size"], "iterations": summary["end"],
            "losses": summary["losses"], "encoder_exported": bool(summary["encoder"]), "precision": summary["precision"]}


def align_smoke(cfg: dict[str, Any], cache_dir: Path, run_dir: Path, device: torch.device, tok_dir: Path) -> dict[str, Any]:
    """The real stage-2 ``train_align()`` (vit-micro, tiny BERT) for a few iterations inside the process group."""
    from decipher_mr.train.align import ALIGN_DEFAULTS, train_align
    from decipher_mr.train.run_config import load_run_config

    conf = load_run_config(None, ALIGN_DEFAULTS, [
        f"cache={cache_dir}", f"output={run_dir}", f"device={device.type}", f"iterations={cfg['align_iterations']}",
        "batch_size=4", "chunks=2", "image.size=[32,32,16]", "progress=false", "checkpoint_every=1"])
    conf["text"] = {"path": str(tok_dir), "tiny": True, "hidden": 32, "layers": 2, "heads": 2, "max_length": 128}
    summary = train_align(conf)
    return {"ok": True, "iterations": summary["iterations"], "final_loss": summary["final_loss"]}


def worker(args: argparse.Namespace) -> int:
    """Runs under torchrun: a real process group (NCCL on CUDA, gloo on CPU), then stage 1 and stage 2."""
    import torch.distributed as dist

    from decipher_mr.train.distributed import init_distributed, shutdown_distributed

    cfg = MODES["cpu" if args.cpu_smoke else "gpu"]
    out: dict[str, Any] = {"errors": {}}
    cuda = not args.cpu_smoke
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    def init_group() -> None:
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        init_distributed(device.type)  # records the training device for the collective helpers

    init_group()
    out["process_group"] = {
        "initialized": dist.is_initialized(), "backend": str(dist.get_backend()), "world_size": dist.get_world_size(),
        "rank": dist.get_rank(), "torchrun": "TORCHELASTIC_RUN_ID" in os.environ, "local_rank": local_rank,
        "pid": os.getpid(), "device": str(device),
    }
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)  # the group really works
    out["process_group"]["all_reduce_ok"] = float(probe) == dist.get_world_size()
    peak = bf16_gemm_peak(device, cfg["gemm_n"], cfg["gemm_reps"])
    out["peak_bf16"] = peak
    cache_dir, work = Path(args.cache), Path(args.work)
    tok_dir = Path(args.tokenizer)
    out["phase_s"] = {}
    for name, fn in (("stage1", lambda: stage1_fitting(cfg, cache_dir, device, peak["tflops"])),
                     ("stage2", lambda: stage2(cfg, cache_dir, device, tok_dir))):
        t_phase = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as exc:
            traceback.print_exc()
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
        out["phase_s"][name] = time.perf_counter() - t_phase
        if cuda:
            torch.cuda.empty_cache()
    # The real training loops inside the group; each ends with shutdown_distributed() (destroys the group).
    for name, fn in (("trainer_smoke", lambda: trainer_smoke(cfg, cache_dir, work / "stage1-run", device)),
                     ("align_smoke", lambda: align_smoke(cfg, cache_dir, work / "align-run", device, tok_dir))):
        t_phase = time.perf_counter()
        if not dist.is_initialized():
            init_group()
        out[name] = {"ok": False, "backend": str(dist.get_backend())}
        try:
            out[name] = {**out[name], **fn()}
        except Exception as exc:
            traceback.print_exc()
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
        out["phase_s"][name] = time.perf_counter() - t_phase
    shutdown_distributed()
    # None of these may be imported by the decipher_mr code a GPU run uses (they are not installed there).
    out["blocked_modules_loaded"] = sorted(m for m in BLOCKED_ON_GPU_MACHINE if m in sys.modules)
    Path(args.result).write_text(json.dumps(out, indent=1))
    return 1 if out["errors"] else 0


# ---------------------------------------------------------------------------------------------
# the parent: cache, torchrun child, encoder latency, table and JSON

def run_child(args: argparse.Namespace, cache_dir: Path, work: Path, tok_dir: Path, timeout_s: float) -> tuple[dict, int, list[str]]:
    result = work / "child.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--worker", "--cache", str(cache_dir), "--work", str(work),
           "--tokenizer", str(tok_dir), "--result", str(result)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "DecipherMRTraining"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "2" if args.cpu_smoke else "8")
    env["PYTHONUNBUFFERED"] = "1"
    print("+ " + " ".join(cmd[:6]) + " ... --worker", flush=True)
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    data = json.loads(result.read_text(encoding="utf-8")) if result.exists() else {"errors": {"torchrun": f"child exited {rc} without a result"}}
    return data, rc, ["torchrun", "--standalone", "--nproc_per_node=1", "Testing/bench/gpu_bench.py", "--worker"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps, gloo on the CPU (tests): figures meaningless")
    ap.add_argument("--out", help="folder for gpu_bench.json (default: $OUT, else ./gpu-bench-out)")
    ap.add_argument("--cache", help="a prepared cache to use instead of the synthetic one")
    ap.add_argument("--no-monai", action="store_true", help="use RefViT as the baseline even if monai imports")
    ap.add_argument("--child-timeout", type=float, default=300.0, help="seconds for the torchrun child (stage 1 + 2)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    t_start = time.perf_counter()
    mode = "cpu" if args.cpu_smoke else "gpu"
    cfg = MODES[mode]
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --cpu-smoke on a CPU)", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu-bench-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory(prefix="gpu_bench_")
    work = Path(tmp.name)
    t0 = time.perf_counter()
    if args.cache:
        cache_dir = Path(args.cache)
        cache_note = f"prepared cache {cache_dir}"
    else:
        cache_dir = build_synthetic_cache(work / "cache", cfg["cache_items"], cfg["cache_shape"], cfg["cache_spacing"])
        cache_note = (f"synthetic: {cfg['cache_items']} head-like volumes {cfg['cache_shape']} at {cfg['cache_spacing']} mm "
                      "(the demo corpus needs SimpleITK/nibabel/nilearn + MRI templates, absent on the GPU machine)")
    from decipher_mr.data.cache import PreparedCache

    tok_dir = write_tokenizer_folder(work / "tokenizer", [it.report or "" for it in PreparedCache(cache_dir).items])
    cache_s = time.perf_counter() - t0

    report: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if mode == "gpu" else f"CPU ({platform.machine()})",
        "cuda": torch.version.cuda, "data": cache_note, "cache_build_s": cache_s,
        "goals": {"stage1_mfu": GOAL_MFU, "encoder_speedup_bf16": GOAL_ENCODER_SPEEDUP}, "errors": {},
    }
    t0 = time.perf_counter()
    child, rc, cmd = run_child(args, cache_dir, work, tok_dir, args.child_timeout)
    report["phase_s"] = {"cache": cache_s, "torchrun_child": time.perf_counter() - t0, **{f"child/{k}": v for k, v in child.get("phase_s", {}).items()}}
    report["torchrun_command"] = " ".join(cmd)
    report["torchrun_exit"] = rc
    for key in ("process_group", "peak_bf16", "stage1", "stage2", "trainer_smoke", "align_smoke", "blocked_modules_loaded"):
        report[key] = child.get(key)
    report["errors"].update(child.get("errors", {}))
    if rc and not report["errors"]:
        report["errors"]["torchrun"] = f"child exited {rc}"
    device = torch.device("cuda", 0) if mode == "gpu" else torch.device("cpu")
    t0 = time.perf_counter()
    try:
        try:
            report["encoder"] = encoder_latency(cfg, device, prefer_monai=not args.no_monai)
        except Exception as exc:
            if args.no_monai or "monai" not in sys.modules:
                raise
            traceback.print_exc()  # monai imported but failed (another torch/numpy): fall back to RefViT
            report["encoder"] = encoder_latency(cfg, device, prefer_monai=False)
            report["encoder"]["monai_missing_reason"] = f"monai failed: {type(exc).__name__}: {exc}"
    except Exception as exc:
        traceback.print_exc()
        report["encoder"] = None
        report["errors"]["encoder"] = f"{type(exc).__name__}: {exc}"
    report["phase_s"]["encoder"] = time.perf_counter() - t0
    report["elapsed_s"] = time.perf_counter() - t_start
    path = out_dir / RESULT_NAME
    path.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nfigures: {path}   ({report['elapsed_s']:.0f} s)")
    tmp.cleanup()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
