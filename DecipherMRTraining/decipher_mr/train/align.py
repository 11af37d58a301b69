"""Stage 2: CLIP alignment of the image and report towers in a shared 512-d space.

Each iteration takes one organ-homogeneous global batch (:class:`RegionBatchSampler`); every rank
encodes its share, and the CLIP loss gathers features across ranks with gradients.

**Large batches on small memory (GradCache).** With ``chunks > 1`` a rank's share is encoded in
``chunks`` pieces: first every feature without autograd, then the loss over the *whole* batch
(all negatives, all ranks) gives the gradient of each feature, then each piece is re-encoded with
autograd and back-propagated with that feature gradient. The result equals one big-batch step;
memory is that of one piece. Dropout/drop-path randomness is replayed so both passes agree: each
piece's re-encoding starts from the CPU generator state and the generator state of every
accelerator device (cuda, ...) that the first encoding of that piece started from.

Gradients are averaged over ranks explicitly after the backward (not by DDP hooks), because the
feature-gradient pass of GradCache runs outside any wrapped forward.

Output folder::

    OUTPUT/checkpoints/ckpt-*/     generic checkpoint (+ tokenizer/)
    OUTPUT/model/                  exported aligned model (load_image_text_model)
    OUTPUT/tensorboard/
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.sampling import RegionBatchSampler
from decipher_mr.models.clip import (
    ImageTextModel,
    build_vision_from_spec,
    model_record,
    save_image_text_model,
    tower_is_frozen,
)
from decipher_mr.models.text import TextTower, pad_token_ids, tokenize_reports
from decipher_mr.train import checkpoint as ckpt
from decipher_mr.train.clip_loss import ClipLoss
from decipher_mr.train.distributed import all_reduce_mean, barrier, run_distributed
from decipher_mr.train.ssl.export import teacher_backbone_from_run
from decipher_mr.train.monitor import TrainingMonitor, effective_rank
from decipher_mr.train.schedules import TrainingSchedules, apply_to_optimizer

ALIGN_DEFAULTS: dict[str, Any] = {
    "cache": None,
    "output": None,
    "vision": {"preset": "vit-micro"},
    "text": {"path": None, "tiny": False, "pooling": "mean", "max_length": 256},
    "vision_trainable": "all",
    "text_trainable": "all",
    "embed_dim": 512,
    "image": {"size": [64, 64, 64], "mode": "crop", "augment": True},
    "batch_size": 16,
    "chunks": 1,
    "iterations": 200,
    "lr": 1e-4,
    "min_lr": 1e-6,
    "warmup_iterations": 20,
    "weight_decay": 0.05,
    "text_lr_scale": 0.1,
    "region_groups": None,
    "seed": 0,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,
    "device": None,
    "train_split": "train",
    "resume": True,
    "progress": True,
}


# ---------------------------------------------------------------------------------------------
# image views

def fit_volume(array: np.ndarray, size: Sequence[int], mode: str = "crop", rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``size`` view of a prepared array: zero-pad then crop (random with ``rng``, else centred),
    or with ``mode="resize"`` a trilinear resize of the whole volume.

    >>> fit_volume(cache.load(0), (64, 64, 64))            # centred crop, float32
    """
    size = tuple(int(s) for s in size)
    if mode == "resize":
        t = torch.from_numpy(np.array(array, dtype=np.float32))[None, None]  # a copy: cache arrays are read-only maps
        return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    if mode != "crop":
        raise ValueError(f"image mode must be 'crop' or 'resize', not {mode!r}")
    arr = np.asarray(array, dtype=np.float32)
    pad = [(max(0, s - a) // 2, max(0, s - a) - max(0, s - a) // 2) for a, s in zip(arr.shape, size)]
    if any(p for pair in pad for p in pair):
        arr = np.pad(arr, pad, mode="constant")
    starts = []
    for a, s in zip(arr.shape, size):
        room = a - s
        starts.append(int(rng.integers(0, room + 1)) if rng is not None and room > 0 else room // 2)
    sl = tuple(slice(b, b + s) for b, s in zip(starts, size))
    return np.ascontiguousarray(arr[sl])


def augment_intensity(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light intensity jitter (scale ±10 %, shift ±0.1, noise σ 0.02). No flips: left/right is in the reports."""
    out = volume * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    return (out + rng.normal(0.0, 0.02, size=volume.shape)).astype(np.float32)


def image_batch(cache: PreparedCache, indices: Sequence[int], image_cfg: dict[str, Any],
                rng: np.random.Generator | None) -> torch.Tensor:
    """(B, 1, X, Y, Z) float32 views of cache items; ``rng=None`` gives the deterministic eval view."""
    views = []
    for i in indices:
        try:
            arr = cache.load(i)
        except Exception as exc:  # a damaged item should name itself, not crash anonymously
            raise RuntimeError(f"{cache.root / cache.items[i].array}: cannot read item {cache.items[i].id} ({exc})") from exc
        v = fit_volume(arr, image_cfg["size"], image_cfg.get("mode", "crop"), rng)
        if rng is not None and image_cfg.get("augment", True):
            v = augment_intensity(v, rng)
        views.append(torch.from_numpy(v))
    return torch.stack(views)[:, None]


# ---------------------------------------------------------------------------------------------
# model and optimiser

def build_model(cfg: dict[str, Any]) -> ImageTextModel:
    """The two towers from an align config, with freezing applied."""
    text_spec = cfg["text"] if isinstance(cfg["text"], dict) else {"path": cfg["text"]}
    model = ImageTextModel(build_vision_from_spec(cfg["vision"], run_loader=teacher_backbone_from_run), TextTower.from_spec(text_spec),
                           embed_dim=int(cfg["embed_dim"]))
    model.set_trainable(cfg["vision_trainable"], cfg["text_trainable"])
    return model


def param_groups(model: ImageTextModel, text_lr_scale: float) -> list[dict[str, Any]]:
    # a pretrained BERT drifts away from language under a vision-sized learning rate
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_scale = text_lr_scale if name.startswith("text.") else 1.0
        wd_scale = 0.0 if (p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
                           or name == "logit_scale") else 1.0
        g = groups.setdefault((lr_scale, wd_scale), {"params": [], "lr_scale": lr_scale, "wd_scale": wd_scale})
        g["params"].append(p)
    return list(groups.values())


def average_gradients(model: torch.nn.Module) -> None:
    """Mean of every gradient over ranks, in one flat buffer (no-op on one process)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    pos = 0
    for g in grads:
        g.copy_(flat[pos : pos + g.numel()].view_as(g))
        pos += g.numel()


def broadcast_parameters(model: torch.nn.Module) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


# ---------------------------------------------------------------------------------------------
# one step

# RNG replay for GradCache, as torch.utils.checkpoint does it: the CPU generator plus the default
# generator of every accelerator device the forward touches, through the device-generic
# ``torch.get_device_module(type).get_rng_state(device)`` / ``set_rng_state(state, device)`` API
# (the one torch.random.fork_rng uses; cuda, xpu, mps, mtia, ... all have it). Device types without
# that API (meta, a backend without generators) are skipped: nothing there can be replayed.

def _rng_module(device_type: str) -> Any | None:
    """``torch.<device_type>`` when it has a per-device RNG state API, else None."""
    if device_type in ("cpu", "meta"):
        return None
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        return None
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None


def rng_devices(*objects: Any) -> list[torch.device]:
    """The distinct non-CPU devices of tensors, modules (parameters and buffers), devices or device
    strings (nested in lists/tuples allowed), in first-seen order; an index-less device is resolved
    to the current device of its type where the type has one."""
    found: dict[torch.device, None] = {}

    def add(obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, torch.nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                add(t.device)
        elif isinstance(obj, torch.Tensor):
            add(obj.device)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)
        else:
            device = torch.device(obj)
            if device.type == "cpu":
                return
            if device.index is None:
                module = _rng_module(device.type)
                if module is not None and hasattr(module, "current_device"):
                    device = torch.device(device.type, int(module.current_device()))
            found.setdefault(device, None)

    for obj in objects:
        add(obj)
    return list(found)


class RngState:
    """A snapshot of the CPU generator and of the default generator of each given device."""

    def __init__(self, devices: Sequence[torch.device] = ()):
        self.cpu = torch.get_rng_state()
        self.devices: list[tuple[torch.device, Any, torch.Tensor]] = []
        for device in devices:
            module = _rng_module(device.type)
            if module is not None:
                self.devices.append((device, module, module.get_rng_state(device)))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, module, state in self.devices:
            module.set_rng_state(state, device)


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run a block from a saved :class:`RngState` (so a re-forward draws the same dropout masks on
    the CPU and on every device in it), then put back the streams it found: a fork, so the global
    streams go on as if the block had not run."""
    outside = RngState([device for device, _, _ in state.devices])
    state.restore()
    try:
        yield
    finally:
        outside.restore()


class TextSide:
    """The report side of a batch: live token ids, or pooled features precomputed once when the
    text tower is frozen (then only the projection trains, and each step costs a lookup)."""

    def __init__(self, model: ImageTextModel, reports: Sequence[str], device: torch.device, precompute: bool,
                 progress: bool = False):
        self.model, self.device = model, device
        self.ids = tokenize_reports(model.text.tokenizer, reports, model.text.max_length)
        self.pooled = None
        if precompute:
            model.text.eval()
            self.pooled = model.text.encode(reports, batch_size=32, progress=progress).to(device)

    def embed(self, indices: Sequence[int]) -> torch.Tensor:
        if self.pooled is not None:
            return self.model.project_text(self.pooled[list(indices)])
        batch = pad_token_ids([self.ids[i] for i in indices], self.model.text.tokenizer.pad_token_id)
        return self.model.encode_text(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))


def clip_step(model: ImageTextModel, loss_fn: ClipLoss, images: torch.Tensor, text: TextSide,
              indices: Sequence[int], chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward of one batch; returns ``(loss, image embeddings, text embeddings)`` detached.

    With ``chunks > 1`` this is the GradCache procedure of the module docstring.

    >>> loss, img, txt = clip_step(model, ClipLoss(), images, text_side, batch_indices, chunks=4)
    """
    if chunks <= 1:
        img = model.encode_image(images)
        txt = text.embed(indices)
        loss = loss_fn(img, txt, model.scale())
        loss.backward()
        return loss.detach(), img.detach(), txt.detach()
    bounds = np.array_split(np.arange(len(indices)), min(chunks, len(indices)))
    # generators a chunk's forward may draw from: the CPU one plus those of the devices of the images,
    # of the token ids / pooled features, and of every parameter and buffer of both towers
    devices = rng_devices(images, text.device, text.pooled, model)
    states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for part in bounds:
            states.append(RngState(devices))
            img_parts.append(model.encode_image(images[part]))
            txt_parts.append(text.embed([indices[i] for i in part]))
    img_all = torch.cat(img_parts).requires_grad_(True)
    txt_all = torch.cat(txt_parts).requires_grad_(True)
    loss = loss_fn(img_all, txt_all, model.scale())
    loss.backward()  # gradients of the features (and of logit_scale) over the whole batch
    for part, state in zip(bounds, states):
        with replay_rng(state):
            img = model.encode_image(images[part])
            txt = text.embed([indices[i] for i in part])
        torch.autograd.backward([img, txt], [img_all.grad[part], txt_all.grad[part]])
    return loss.detach(), img_all.detach(), txt_all.detach()


# ---------------------------------------------------------------------------------------------
# the run

def _say(ctx, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def train_align(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run stage-2 alignment from a config (see ``ALIGN_DEFAULTS``); returns a summary.

    >>> train_align(load_run_config("configs/align-demo.json", ALIGN_DEFAULTS, ["iterations=20"]))
    """
    return run_distributed(_train, cfg)


def _train(cfg: dict[str, Any], ctx) -> dict[str, Any]:
    out = Path(cfg["output"])
    cache = PreparedCache(cfg["cache"])
    train_idx = [i for i in cache.indices(split=cfg["train_split"]) if cache.items[i].report]
    if len(train_idx) < 2:
        raise ValueError(f"{cache.root}: fewer than two items with a report in split {cfg['train_split']!r}")
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = build_model(cfg).to(ctx.device)
    broadcast_parameters(model)
    reports = [cache.items[i].report or "" for i in train_idx]
    text = TextSide(model, reports, ctx.device, precompute=tower_is_frozen(model.text),
                    progress=ctx.is_main and cfg.get("progress", True))
    sampler = RegionBatchSampler([cache.items[i].body_region for i in train_idx], int(cfg["batch_size"]), seed=seed,
                                 rank=ctx.rank, world_size=ctx.world_size, groups=cfg.get("region_groups"))
    iterations = int(cfg["iterations"])
    sched = TrainingSchedules.build(iterations, lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]),
                                    warmup_iterations=int(cfg["warmup_iterations"]),
                                    weight_decay=float(cfg["weight_decay"]))
    optimizer = torch.optim.AdamW(param_groups(model, float(cfg["text_lr_scale"])), lr=float(cfg["lr"]))
    arch = {"model": {k: v for k, v in model_record(model).items() if k in ("embed_dim", "vision")},
            "text_hidden": model.text.hidden_size, "text_layers": model.text.backbone.config.num_hidden_layers,
            "trainable": [str(cfg["vision_trainable"]), str(cfg["text_trainable"])]}
    ckpt_root = out / "checkpoints"
    start = 0
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.get("resume", True) else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, {"model": model}, {"adamw": optimizer}, architecture=arch)
        start = int(state["iteration"])
        _say(ctx, f"align: resumed from {latest} at iteration {start}")
    _say(ctx, f"align: {len(train_idx)} training pairs in {len(sampler.members)} region group(s) "
              f"({', '.join(sorted(sampler.members))}), {sampler.batches_per_epoch()} batches/epoch, "
              f"global batch {cfg['batch_size']} in {cfg['chunks']} chunk(s), world size {ctx.world_size}, "
              f"vision {cfg['vision_trainable']}, text {cfg['text_trainable']}"
              f"{' (text features precomputed)' if text.pooled is not None else ''}")
    loss_fn = ClipLoss()
    monitor = TrainingMonitor(out, total=iterations, start=start, enabled=ctx.is_main and cfg.get("progress", True),
                              desc="align")
    model.train()
    model.set_frozen_towers_eval()
    last_loss = float("nan")
    stream = sampler.stream(start)
    try:
        for it in range(start, iterations):
            local = next(stream)
            apply_to_optimizer(optimizer, **{k: v for k, v in sched.at(it).items() if k in ("lr", "weight_decay")})
            rng = np.random.default_rng([seed, it, ctx.rank])
            images = image_batch(cache, [train_idx[i] for i in local], cfg["image"], rng).to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            loss, img, txt = clip_step(model, loss_fn, images, text, local, int(cfg["chunks"]))
            average_gradients(model)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            model.clamp_logit_scale_()
            last_loss = float(all_reduce_mean(loss.clone()))
            metrics = {"loss": last_loss, "lr": sched.at(it)["lr"], "temperature": float(1 / model.scale().detach())}
            if (it + 1) % 10 == 0 or it + 1 == iterations:
                metrics["rank/image"] = effective_rank(img)
                metrics["rank/text"] = effective_rank(txt)
            monitor.step(it + 1, metrics, samples=len(local) * ctx.world_size)
            done = it + 1
            if done % int(cfg["checkpoint_every"]) == 0 or done == iterations:
                if ctx.is_main:
                    path = ckpt.save_checkpoint(ckpt_root, done, {"model": model}, {"adamw": optimizer},
                                                {"config": {k: v for k, v in cfg.items() if k != "progress"},
                                                 "model_record": model_record(model)},
                                                architecture=arch, keep=int(cfg["keep_checkpoints"]))
                    model.text.tokenizer.save_pretrained(str(path / "tokenizer"))
                barrier()
    finally:
        monitor.close()
    summary = {"iterations": iterations, "start_iteration": start, "final_loss": last_loss, "temperature": float(1 / model.scale().detach()),
               "train_pairs": len(train_idx)}
    if ctx.is_main:
        save_image_text_model(model, out / "model", extra={"training": {"image": cfg["image"], "summary": summary}})
        _say(ctx, f"align: final loss {last_loss:.4f}, temperature {summary['temperature']:.4f}; "
                  f"model written to {out / 'model'}")
    barrier()
    return summary
