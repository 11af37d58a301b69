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

**Across ranks.** The towers (:class:`TowerForward`) run inside DDP, whose bucketed all-reduce
overlaps with the backward. With GradCache every chunk's second-pass backward but the last runs
under ``no_sync()``: the gradients of all chunks accumulate locally and DDP reduces them once,
during the last chunk's backward. ``logit_scale`` only enters the loss (evaluated outside any
wrapped forward) and is averaged by hand.

**Speed (issue 13).** ``train.precision`` ``auto`` runs the towers under bf16 autocast where bf16 is
native (CUDA) and in fp32 elsewhere; the embeddings, CLIP loss and temperature are fp32. TF32 is
allowed on CUDA, AdamW is fused on CUDA, ``train.compile`` compiles the towers, images are read and
augmented by ``data.num_workers`` DataLoader workers and sent as fp16, and a step synchronises with
the host once (:func:`decipher_mr.train.runtime.fetch_metrics`).

Output folder::

    OUTPUT/checkpoints/ckpt-*/     generic checkpoint (+ tokenizer/)
    OUTPUT/model/                  exported aligned model (load_image_text_model)
    OUTPUT/tensorboard/
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

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
from decipher_mr.models.vit3d import precision_context, resolve_precision
from decipher_mr.train import checkpoint as ckpt
from decipher_mr.data.views import check_view
from decipher_mr.train.rng_state import RngState, _rng_module, replay_rng, rng_devices  # noqa: F401 (re-exported)
from decipher_mr.train.align_views import AlignBatches, augment_intensity, fit_volume, image_batch  # noqa: F401 (re-exported)
from decipher_mr.train.clip_loss import ClipLoss
from decipher_mr.train.distributed import all_reduce_mean, barrier, run_distributed
from decipher_mr.train.monitor import TrainingMonitor
from decipher_mr.train.runtime import adamw_options, configure_math, fetch_metrics
from decipher_mr.train.schedules import TrainingSchedules, apply_to_optimizer
from decipher_mr.train.ssl.export import teacher_backbone_from_run

ALIGN_DEFAULTS: dict[str, Any] = {
    "cache": None,
    "output": None,
    "vision": {"preset": "vit-micro"},
    "text": {"path": None, "tiny": False, "pooling": "mean", "max_length": 256},
    "vision_trainable": "all",
    "text_trainable": "all",
    "embed_dim": 512,
    # the image view (decipher_mr.data.views), recorded in the model: the served embedding embeds it too
    "image": {"size": [64, 64, 64], "mode": "fit", "augment": True},
    "batch_size": 16,
    "chunks": 1,
    "iterations": 200,
    "lr": 1e-4,
    "min_lr": 1e-6,
    "warmup_iterations": 20,
    "weight_decay": 0.05,
    "text_lr_scale": 0.1,
    "region_groups": None,
    # share of each epoch's items batched across body regions (the rest: one region per batch); see
    # decipher_mr.data.sampling. 0 never contrasts a brain with a knee, 1 is plain random batches.
    "mixed_fraction": 0.5,
    "seed": 0,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,
    "device": None,
    "train_split": "train",
    "resume": True,
    "progress": True,
    # precision: "auto" (bf16 autocast where bf16 is native, e.g. CUDA; fp32 elsewhere), "bf16", "fp32".
    # compile: torch.compile the two towers' forward (needs a C compiler; first steps are slow).
    "train": {"precision": "auto", "compile": False},
    # DataLoader worker processes that read and augment the images (0: the main process)
    "data": {"num_workers": 2},
}


# ---------------------------------------------------------------------------------------------
# model and optimiser

def build_model(cfg: dict[str, Any]) -> ImageTextModel:
    """The two towers from an align config, with freezing applied."""
    text_spec = cfg["text"] if isinstance(cfg["text"], dict) else {"path": cfg["text"]}
    model = ImageTextModel(build_vision_from_spec(cfg["vision"], run_loader=teacher_backbone_from_run), TextTower.from_spec(text_spec),
                           embed_dim=int(cfg["embed_dim"]))
    model.set_trainable(cfg["vision_trainable"], cfg["text_trainable"])
    model.image_view = check_view(cfg["image"])
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

STATISTICS_ITEMS = 64


@torch.no_grad()
def feature_statistics(model: ImageTextModel, cache, train_idx: Sequence[int], image_cfg: dict[str, Any], text: "TextSide",
                       device: torch.device, limit: int = STATISTICS_ITEMS) -> None:
    """Set the model's feature centre and scale from (up to ``limit``, evenly spread) training items, in fp32:
    the deterministic image views and the reports' pooled text features. Every rank computes the same."""
    train_idx = list(train_idx)
    positions = list(range(0, len(train_idx), max(1, -(-len(train_idx) // limit))))[:limit]
    pick = [train_idx[p] for p in positions]
    was_training = model.training
    model.eval()
    pooled = [model.image_pooled(image_batch(cache, pick[s : s + 8], image_cfg, None).to(device)).float()
              for s in range(0, len(pick), 8)]
    if text.pooled is not None:
        text_feats = text.pooled[positions].float()
    else:
        ids = text.inputs(positions)
        text_feats = model.text_pooled(*ids).float()
    model.set_feature_statistics(torch.cat(pooled), text_feats)
    model.train(was_training)
    if was_training:
        model.set_frozen_towers_eval()


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

    def inputs(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """What :class:`TowerForward` takes for these reports: ``(pooled,)`` or ``(ids, mask)``."""
        if self.pooled is not None:
            return (self.pooled[list(indices)],)
        batch = pad_token_ids([self.ids[i] for i in indices], self.model.text.tokenizer.pad_token_id)
        return (batch.input_ids.to(self.device, non_blocking=True), batch.attention_mask.to(self.device, non_blocking=True))

    def embed(self, indices: Sequence[int]) -> torch.Tensor:
        return TowerForward.embed_text(self.model, self.inputs(indices))


class TowerForward(torch.nn.Module):
    """Both towers and their projections (not ``logit_scale``) as one ``forward``, the module DDP
    wraps in stage 2: ``(images, text inputs) -> (image embeddings, report embeddings)``.

    The submodules are the model's own (shared parameters); ``logit_scale`` only enters the loss,
    which GradCache evaluates outside any forward, so it is averaged over ranks by hand.
    """

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.vision, self.text, self.image_proj, self.text_proj = model.vision, model.text, model.image_proj, model.text_proj
        object.__setattr__(self, "clip", model)  # not a submodule: its logit_scale stays out of DDP

    @staticmethod
    def embed_text(model: ImageTextModel, text_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(text_inputs) == 1:
            return model.project_text(text_inputs[0])
        return model.encode_text(*text_inputs)

    def forward(self, images: torch.Tensor, *text_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images), self.embed_text(self.clip, text_inputs)


def parameters_without_gradient(towers: TowerForward, images: torch.Tensor, text_inputs: Sequence[torch.Tensor]) -> list[str]:
    """Names of trainable parameters of ``towers`` that a forward never reaches (the ViT's
    ``mask_token`` in stage 2, an unused pooler, ...), found by walking the autograd graph of one
    probe forward (no backward; the RNG streams are left as they were). DDP must ignore them."""
    devices = rng_devices(images, towers)
    reached: set[int] = set()
    with replay_rng(RngState(devices)), torch.enable_grad():
        outputs = towers(images, *text_inputs)
        stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
        # the Python wrappers of autograd nodes are made on access and freed with their last reference,
        # so an id() alone can be reused by another node: keep every visited wrapper alive
        visited: dict[int, Any] = {}
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in visited:
                continue
            visited[id(fn)] = fn
            if hasattr(fn, "variable"):
                reached.add(id(fn.variable))
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return [n for n, p in towers.named_parameters() if p.requires_grad and id(p) not in reached]


def wrap_towers(model: ImageTextModel, ctx, probe_images: torch.Tensor, probe_text: Sequence[torch.Tensor]) -> torch.nn.Module:
    """:class:`TowerForward` of ``model``, in DDP when there is a process group.

    DDP's bucketed all-reduce then runs *during* the backward (overlapping communication with the
    remaining gradient computation) instead of one flat all-reduce after it; :func:`clip_step`
    keeps GradCache exact by back-propagating every chunk but the last under ``no_sync()``, so the
    buckets are reduced once, in the last chunk's backward, over the gradients of all chunks.
    """
    towers = TowerForward(model)
    if not ctx.is_distributed:
        return towers
    ignore = parameters_without_gradient(towers, probe_images, probe_text)
    trainable = [n for n, p in towers.named_parameters() if p.requires_grad]
    find_unused = False
    if trainable and len(ignore) == len(trainable):
        # the probe reached none of them: the walk cannot see through this forward (a custom autograd
        # function, say). DDP then finds unused parameters itself, at some cost per step.
        _say(ctx, f"align: the probe forward reached none of the {len(trainable)} trainable tower parameters; "
                  "DDP will search for unused parameters every step instead")
        ignore, find_unused = [], True
    elif ignore:
        _say(ctx, f"align: DDP ignores {len(ignore)} of {len(trainable)} trainable parameters that the forward "
                  f"never reaches ({', '.join(ignore[:4])}{', ...' if len(ignore) > 4 else ''})")
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(towers, ignore)
    return torch.nn.parallel.DistributedDataParallel(
        towers, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=find_unused)


def average_gradients(model: torch.nn.Module | Sequence[torch.nn.Parameter]) -> None:
    """Mean of every gradient over ranks, in one flat buffer (no-op on one process).

    Stage 2 leaves the towers to DDP and passes only what DDP does not cover (``logit_scale``)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    pos = 0
    for g in grads:
        g.copy_(flat[pos : pos + g.numel()].view_as(g))
        pos += g.numel()


def clip_step(model: ImageTextModel, loss_fn: ClipLoss, images: torch.Tensor, text: TextSide,
              indices: Sequence[int], chunks: int = 1, precision: str = "fp32",
              towers: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward of one batch; returns ``(loss, image embeddings, text embeddings)`` detached.

    With ``chunks > 1`` this is the GradCache procedure of the module docstring. The towers run
    under ``precision`` (``"bf16"``: autocast; ``"fp32"``), entered afresh for every chunk forward
    so the cached and the replayed forward do the same arithmetic; the embeddings are cast to fp32
    and the CLIP loss and temperature are computed in fp32 outside autocast. ``towers`` is the
    module to run the chunks through (:func:`wrap_towers`: DDP under a process group); by default
    the plain :class:`TowerForward` of ``model``. Nothing here waits for the device.

    >>> loss, img, txt = clip_step(model, ClipLoss(), images, text_side, batch_indices, chunks=4)
    """
    towers = towers if towers is not None else TowerForward(model)
    plain = towers.module if isinstance(towers, torch.nn.parallel.DistributedDataParallel) else towers
    device_type = images.device.type

    def encode(module, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with precision_context(device_type, precision):
            img, txt = module(images[rows], *text.inputs(indices[rows]))
        return img.float(), txt.float()

    indices = list(indices)
    if chunks <= 1:
        img, txt = encode(towers, slice(0, len(indices)))
        loss = loss_fn(img, txt, model.scale())
        loss.backward()
        return loss.detach(), img.detach(), txt.detach()
    bounds = [slice(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(len(indices)), min(chunks, len(indices)))]
    # generators a chunk's forward may draw from: the CPU one plus those of the devices of the images,
    # of the token ids / pooled features, and of every parameter and buffer of both towers
    devices = rng_devices(images, text.device, text.pooled, model)
    states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for rows in bounds:
            states.append(RngState(devices))
            img, txt = encode(plain, rows)  # no autograd: DDP is not involved
            img_parts.append(img)
            txt_parts.append(txt)
    img_all = torch.cat(img_parts).requires_grad_(True)
    txt_all = torch.cat(txt_parts).requires_grad_(True)
    loss = loss_fn(img_all, txt_all, model.scale())
    loss.backward()  # gradients of the features (and of logit_scale) over the whole batch, in fp32
    ddp = isinstance(towers, torch.nn.parallel.DistributedDataParallel)
    for n, (rows, state) in enumerate(zip(bounds, states)):
        last = n == len(bounds) - 1
        # DDP reduces gradients only in the last chunk's backward, over the sum of all chunks
        with (towers.no_sync() if ddp and not last else contextlib.nullcontext()):
            with replay_rng(state):
                img, txt = encode(towers, rows)
            torch.autograd.backward([img, txt], [img_all.grad[rows], txt_all.grad[rows]])
    return loss.detach(), img_all.detach(), txt_all.detach()


def effective_rank_tensor(embeddings: torch.Tensor) -> torch.Tensor:
    """:func:`decipher_mr.train.monitor.effective_rank` as a 0-d tensor, without a host sync in the
    formula itself (run it on a host copy: ``svdvals`` synchronises on CUDA)."""
    x = embeddings.float()
    x = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2:
        return torch.tensor(float("nan"))
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(torch.special.entr(p).sum())


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
                                 rank=ctx.rank, world_size=ctx.world_size, groups=cfg.get("region_groups"),
                                 mixed_fraction=float(cfg.get("mixed_fraction", 0.0)))
    iterations = int(cfg["iterations"])
    sched = TrainingSchedules.build(iterations, lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]),
                                    warmup_iterations=int(cfg["warmup_iterations"]),
                                    weight_decay=float(cfg["weight_decay"]))
    optimizer = torch.optim.AdamW(param_groups(model, float(cfg["text_lr_scale"])), lr=float(cfg["lr"]),
                                  **adamw_options(ctx.device))
    tc = {**ALIGN_DEFAULTS["train"], **(cfg.get("train") or {})}
    precision = resolve_precision(ctx.device, tc["precision"])
    configure_math(ctx.device)
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
    else:
        feature_statistics(model, cache, train_idx, cfg["image"], text, ctx.device)
    _say(ctx, f"align: {len(train_idx)} training pairs in {len(sampler.members)} region group(s) "
              f"({', '.join(sorted(sampler.members))}, {sampler.mixed_fraction:.0%} of items in mixed-region batches), "
              f"{sampler.batches_per_epoch()} batches/epoch, "
              f"global batch {cfg['batch_size']} in {cfg['chunks']} chunk(s), world size {ctx.world_size}, "
              f"vision {cfg['vision_trainable']}, text {cfg['text_trainable']}"
              f"{' (text features precomputed)' if text.pooled is not None else ''}")
    loss_fn = ClipLoss()
    monitor = TrainingMonitor(out, total=iterations, start=start, enabled=ctx.is_main and cfg.get("progress", True),
                              desc="align")
    model.train()
    model.set_frozen_towers_eval()
    dataset = AlignBatches(cache, train_idx, sampler, cfg["image"], seed, ctx.rank)
    workers = int((cfg.get("data") or {}).get("num_workers", 0))
    # batch_size=None: each item is a whole batch; the loader reads iterations start.. in order
    loader = torch.utils.data.DataLoader(dataset, sampler=range(start, iterations), batch_size=None,
                                         num_workers=workers, pin_memory=ctx.device.type == "cuda",
                                         prefetch_factor=2 if workers else None)
    probe = torch.zeros((1, 1, *(int(v) for v in cfg["image"]["size"])), device=ctx.device)
    towers = wrap_towers(model, ctx, probe, text.inputs([0]))
    if tc.get("compile"):
        # in place (state_dict keys unchanged); recompiles happen on a new batch shape or grad mode
        model.vision.compile()
        if text.pooled is None:
            model.text.compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    last_loss = float("nan")
    try:
        for it, (local, images) in zip(range(start, iterations), loader):
            apply_to_optimizer(optimizer, **{k: v for k, v in sched.at(it).items() if k in ("lr", "weight_decay")})
            images = images.to(ctx.device, non_blocking=True).float()  # sent as fp16 from the workers
            optimizer.zero_grad(set_to_none=True)
            loss, img, txt = clip_step(model, loss_fn, images, text, local, int(cfg["chunks"]), precision, towers)
            if ctx.is_distributed:
                average_gradients([model.logit_scale])  # the towers' gradients were reduced by DDP
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            model.clamp_logit_scale_()
            # the step's one host synchronisation: all its scalars, averaged over ranks, fetched together
            want_rank = (it + 1) % 10 == 0 or it + 1 == iterations
            if want_rank:  # copied to the host without waiting; complete once the fetch below returns
                host = (img.to("cpu", non_blocking=True), txt.to("cpu", non_blocking=True))
            metrics = fetch_metrics({"loss": loss, "temperature": 1 / model.scale().detach(), "grad_norm": grad_norm})
            last_loss = metrics["loss"]
            metrics["lr"] = sched.at(it)["lr"]
            if want_rank:
                metrics["rank/image"] = float(effective_rank_tensor(host[0]))
                metrics["rank/text"] = float(effective_rank_tensor(host[1]))
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
