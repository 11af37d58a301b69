"""The stage-1 training loop: one process or many (torchrun), resumable exactly, stoppable cleanly.

Run layout (``run_dir``)::

    config.json             the resolved config of the run
    checkpoints/ckpt-*      see decipher_mr.train.checkpoint (student, teacher, loss centres, AdamW)
    metrics.jsonl           one line per iteration: losses, lr, monitors (rewritten on resume)
    tensorboard/            event files
    encoder.safetensors     the exported teacher backbone (+ encoder.json), written at the end

Reproducibility: the data order is a seeded sampler whose position is derived from the iteration,
every sample's augmentation is seeded by its place in the data stream, and the torch RNG (drop path)
is reseeded from ``(seed, iteration, rank)`` each step. A resumed run therefore replays exactly what
the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.models.vit3d import precision_context, resolve_precision, vision_config
from decipher_mr.storage import atomic_write_json, atomic_write_text
from decipher_mr.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from decipher_mr.train.distributed import (
    ResumableDistributedSampler,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from decipher_mr.train.monitor import CollapseWatch, TrainingMonitor
from decipher_mr.train.run_config import load_run_config
from decipher_mr.train.runtime import adamw_options, fetch_metrics
from decipher_mr.train.schedules import TrainingSchedules, apply_to_optimizer
from decipher_mr.train.ssl.export import export_teacher_backbone
from decipher_mr.train.ssl.masking import BlockMaskConfig
from decipher_mr.train.ssl.meta_arch import HeadConfig, SSLMetaArch
from decipher_mr.train.ssl.multicrop import MultiCropConfig, MultiCropDataset, collate_multicrop

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/pretrain-vision",
    "seed": 0,
    "device": "auto",
    "model": {
        "encoder": "vit-base",
        "encoder_overrides": {},
        "dino_prototypes": 65536,
        "ibot_prototypes": 65536,
        "head_hidden_dim": 2048,
        "head_bottleneck_dim": 256,
        "head_layers": 3,
    },
    "data": {"cache": "demo/cache", "split": "train", "body_region": None, "num_workers": 4},
    "crops": {},  # MultiCropConfig fields
    "masking": {"ratio": [0.1, 0.5], "sample_probability": 0.5},
    "loss": {"dino_weight": 1.0, "ibot_weight": 1.0, "koleo_weight": 0.1, "student_temp": 0.1,
             "center_momentum": 0.9, "centering": "centering", "ibot_chunk_rows": 0},
    "optim": {"lr": 5e-4, "min_lr": 1e-6, "warmup_iterations": 1000, "weight_decay": 0.04,
              "weight_decay_end": 0.2, "layer_decay": 0.9, "patch_embed_lr_mult": 0.2, "clip_grad": 3.0,
              "freeze_last_layer_iterations": 1250, "betas": [0.9, 0.999],
              "teacher_momentum": 0.992, "teacher_momentum_end": 1.0, "teacher_temp": 0.07,
              "warmup_teacher_temp": 0.04, "teacher_temp_warmup_iterations": 3000},
    "train": {"iterations": 100000, "batch_size": 64, "precision": "auto", "checkpoint_every": 1000,
              "keep_checkpoints": 3, "log_every": 1, "monitor_every": 20, "max_nan_in_a_row": 5,
              "stop_at": None, "tensorboard": True, "progress": True, "export_teacher": True},
}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults <- JSON file <- ``key=value`` overrides (dotted keys).

    >>> cfg = load_config("configs/vit-small-demo.json", ["train.iterations=200", "data.cache=demo/cache"])
    """
    return load_run_config(path, DEFAULTS, overrides)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then stopping", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C/SIGTERM to the main process, which checkpoints and then shuts
    them down; a worker dying on the terminal's SIGINT would otherwise abort the run mid-step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _rewrite_metrics(path: Path, keep_before: int) -> None:
    """Drop metric lines from iterations a resumed run will redo (written after the last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("iteration", 0) < keep_before]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Run stage-1 pretraining as configured; returns a summary (losses per iteration of this run, ...).

    >>> summary = train(load_config("configs/vit-small-demo.json", ["train.iterations=50"]), resume=True)
    """
    ctx = init_distributed(_device(cfg["device"]))
    try:
        return _train(cfg, resume, ctx)
    finally:
        shutdown_distributed()


def _train(cfg: dict[str, Any], resume: bool, ctx) -> dict[str, Any]:
    tc, oc, mc = cfg["train"], cfg["optim"], cfg["model"]
    run_dir = Path(cfg["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    seed = int(cfg["seed"])
    precision = resolve_precision(ctx.device, tc["precision"])
    if tc["batch_size"] % ctx.world_size:
        raise ValueError(f"train.batch_size {tc['batch_size']} (global) is not divisible by the {ctx.world_size} processes")
    per_rank = tc["batch_size"] // ctx.world_size
    iterations = int(tc["iterations"])
    stop_at = min(int(tc["stop_at"]), iterations) if tc.get("stop_at") is not None else iterations

    # Data: the cache and its selection.
    cache = PreparedCache(cfg["data"]["cache"])
    dc = cfg["data"]
    indices = cache.indices(split=dc.get("split"), body_region=dc.get("body_region"))
    if not indices and dc.get("split"):
        indices = cache.indices(body_region=dc.get("body_region"))  # a cache without splits: use all
    crops = MultiCropConfig.from_dict(cfg["crops"])
    enc_cfg = vision_config(mc["encoder"], **mc.get("encoder_overrides", {}))
    dataset = MultiCropDataset(cache, indices, crops, BlockMaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["masking"].items()}),
                               enc_cfg.patch_size, seed)
    sampler = ResumableDistributedSampler(len(dataset), seed, ctx.rank, ctx.world_size, with_keys=True)

    # Model: identical initialisation on every rank (seeded before building).
    torch.manual_seed(seed)
    heads = HeadConfig(mc["dino_prototypes"], mc["ibot_prototypes"], mc["head_hidden_dim"], mc["head_bottleneck_dim"], mc["head_layers"])
    arch = SSLMetaArch(enc_cfg, heads, cfg["loss"]).to(ctx.device)
    groups = arch.param_groups(oc["layer_decay"], oc.get("patch_embed_lr_mult", 1.0))
    freeze_last_layer = int(oc.get("freeze_last_layer_iterations") or 0)
    opt = torch.optim.AdamW(groups, lr=oc["lr"], betas=tuple(oc["betas"]), **adamw_options(ctx.device))
    schedules = TrainingSchedules.build(
        iterations, oc["lr"], oc["min_lr"], oc["warmup_iterations"], oc["weight_decay"], oc["weight_decay_end"],
        oc["teacher_momentum"], oc["teacher_momentum_end"], oc["teacher_temp"], oc["warmup_teacher_temp"],
        oc["teacher_temp_warmup_iterations"],
    )
    modules = {"student": arch.student, "teacher": arch.teacher, "dino_loss": arch.dino_loss, "ibot_loss": arch.ibot_loss}
    start, skipped = 0, 0
    if resume:
        ck = latest_checkpoint(ckpt_dir)
        if ck is not None:
            state = load_checkpoint(ck, modules, {"adamw": opt}, architecture=arch.architecture())
            start, skipped = int(state["iteration"]), int(state.get("skipped_steps", 0))
            if ctx.is_main:
                print(f"resuming from {ck} (iteration {start})", file=sys.stderr)
        elif ctx.is_main:
            print(f"no checkpoint in {ckpt_dir}: starting from scratch", file=sys.stderr)
    sampler.load_state_dict(sampler.position_after(start * per_rank))
    if ctx.is_distributed:
        arch.student_runner = torch.nn.parallel.DistributedDataParallel(
            arch.student, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None, broadcast_buffers=False
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg)
        _rewrite_metrics(run_dir / "metrics.jsonl", start)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=int(dc.get("num_workers", 0)),
        collate_fn=collate_multicrop, pin_memory=ctx.device.type == "cuda", drop_last=True,
        persistent_workers=False, prefetch_factor=2 if int(dc.get("num_workers", 0)) else None,
        worker_init_fn=_ignore_stop_signals,
    )
    monitor = TrainingMonitor(run_dir, total=stop_at, start=start, enabled=ctx.is_main and tc.get("progress", True),
                              desc="pretrain-vision", log_every=tc["log_every"], tensorboard=tc.get("tensorboard", True))
    watch = CollapseWatch(num_prototypes=heads.dino_prototypes)
    arch.train()
    arch.teacher.eval()
    losses: list[float] = []
    nan_in_a_row = 0
    stopped_by_signal = False
    last_ckpt = None
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if ctx.is_main else None
    it = start
    try:
        with StopRequest() as stop:
            data = iter(loader)
            for it in range(start, stop_at):
                batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(data).items()}
                sch = schedules.at(it)
                apply_to_optimizer(opt, sch["lr"], sch["weight_decay"])
                if it < freeze_last_layer:  # DINOv2's freeze_last_layer: the prototypes' lr is 0 at first
                    for group in opt.param_groups:
                        if group.get("last_layer"):
                            group["lr"] = 0.0
                torch.manual_seed(seed * 1_000_003 + it * 1009 + ctx.rank)
                want_monitor = tc["monitor_every"] > 0 and it % tc["monitor_every"] == 0
                with precision_context(ctx.device, precision):
                    loss, metrics = arch.training_loss(batch, sch["teacher_temp"], monitor=want_monitor)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # Backbone, DINO head and iBOT head are clipped separately (DINOv2); ``grad_norm`` is the
                # norm of the whole gradient before clipping. The norms are the same on every rank after
                # DDP's all-reduce, so all ranks skip together.
                part_norms = arch.clip_gradients(oc.get("clip_grad"))
                # The step's one host sync: every scalar (losses averaged over ranks; the grad norms are
                # the same on every rank after DDP's all-reduce; the stop flag is >0 when any rank got
                # SIGTERM) in one all-reduce on the training device and one copy to the host.
                stop_flag = torch.full((), float(stop.requested), device=ctx.device)
                fetched = fetch_metrics({"loss": loss.detach(), **{k: metrics[k] for k in ("loss/dino", "loss/ibot", "loss/koleo")},
                                         **{f"grad_norm/{k}": v for k, v in part_norms.items()}, "stop": stop_flag})
                grad_norm = math.sqrt(sum(fetched[f"grad_norm/{k}"] ** 2 for k in part_norms))
                if math.isfinite(grad_norm) and math.isfinite(fetched["loss"]):
                    opt.step()
                    arch.update_teacher(sch["momentum"])
                    nan_in_a_row = 0
                else:
                    skipped += 1
                    nan_in_a_row += 1
                    if nan_in_a_row >= tc["max_nan_in_a_row"]:
                        raise FloatingPointError(
                            f"{nan_in_a_row} steps in a row had a non-finite loss or gradient (iteration {it}); "
                            "aborting. Lower optim.lr, raise optim.warmup_iterations or use train.precision=fp32."
                        )
                row = {"iteration": it, "loss": fetched["loss"], "loss/dino": fetched["loss/dino"],
                       "loss/ibot": fetched["loss/ibot"], "loss/koleo": fetched["loss/koleo"], "lr": sch["lr"],
                       "teacher_temp": sch["teacher_temp"], "momentum": sch["momentum"], "grad_norm": grad_norm,
                       **{f"grad_norm/{k}": fetched[f"grad_norm/{k}"] for k in part_norms},
                       "last_layer_frozen": it < freeze_last_layer, "skipped_steps": skipped}
                row.update({k: v for k, v in metrics.items() if k.startswith("monitor/")})
                losses.append(row["loss"])
                if ctx.is_main:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if want_monitor:
                        for msg in watch.check(it, row.get("monitor/teacher_entropy"), row.get("monitor/effective_rank")):
                            monitor.text("collapse", msg, it)
                monitor.step(it, {k: v for k, v in row.items() if k != "iteration"}, samples=tc["batch_size"])
                stop_now = fetched["stop"] > 0
                done = it + 1
                if stop_now or done % tc["checkpoint_every"] == 0 or done == stop_at:
                    last_ckpt = _checkpoint(ckpt_dir, done, modules, opt, arch, enc_cfg, sampler, per_rank, skipped, ctx, tc)
                if stop_now:
                    stopped_by_signal = True
                    if ctx.is_main:
                        print(f"stopped at iteration {done}; resume with --resume", file=sys.stderr)
                    break
    finally:
        monitor.close()
        if metrics_file is not None:
            metrics_file.close()
    exported = None
    if ctx.is_main and not stopped_by_signal and stop_at == iterations and tc.get("export_teacher", True) and last_ckpt:
        exported = export_teacher_backbone(last_ckpt, run_dir / "encoder.safetensors")
    barrier()
    return {"start": start, "end": it + 1 if losses else start, "losses": losses, "skipped_steps": skipped,
            "stopped_by_signal": stopped_by_signal, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "encoder": str(exported) if exported else None, "precision": precision, "world_size": ctx.world_size,
            "backend": ctx.backend}


def _checkpoint(ckpt_dir, iteration, modules, opt, arch, enc_cfg, sampler, per_rank, skipped, ctx, tc) -> Path | None:
    path = None
    if ctx.is_main:
        state = {"sampler": sampler.position_after(iteration * per_rank), "skipped_steps": skipped,
                 "world_size": ctx.world_size, "encoder_config": enc_cfg.to_dict()}
        path = save_checkpoint(ckpt_dir, iteration, modules, {"adamw": opt}, state, arch.architecture(),
                               keep=tc["keep_checkpoints"])
    barrier()
    return path if ctx.is_main else latest_checkpoint(ckpt_dir)
