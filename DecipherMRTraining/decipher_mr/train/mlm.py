"""Stage 1 (text): masked-language-model continued pretraining of the text tower on the cache's reports.

Masking follows BERT: 15 % of the non-special tokens are chosen; of those 80 % become ``[MASK]``, 10 %
a random token and 10 % stay, and the loss is the cross-entropy on the chosen tokens only. The
held-out perplexity (``exp`` of that loss on the ``val`` split, with a fixed masking seed so before
and after are comparable) is printed before and after training.

Speed (issue 13): ``train.precision`` ``auto`` runs the model under bf16 autocast where bf16 is
native (CUDA) and in fp32 elsewhere, with the loss in fp32; TF32 is allowed and AdamW fused on
CUDA; a step synchronises with the host once, to fetch its loss and gradient norm.

Output folder::

    OUTPUT/checkpoints/ckpt-*/          generic checkpoint (+ text_encoder/: a loadable HF folder)
    OUTPUT/text_encoder/                final model + tokenizer (safetensors); give it to `align`
    OUTPUT/metrics.json                 perplexity before/after
    OUTPUT/tensorboard/

Report text is patient data: only counts and losses are printed.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.models.text import load_text_backbone, pad_token_ids, tokenize_reports
from decipher_mr.storage import atomic_folder, atomic_write_json
from decipher_mr.train import checkpoint as ckpt
from decipher_mr.models.vit3d import precision_context, resolve_precision
from decipher_mr.train.distributed import ResumableDistributedSampler, barrier, run_distributed
from decipher_mr.train.monitor import TrainingMonitor
from decipher_mr.train.runtime import adamw_options, configure_math, fetch_metrics
from decipher_mr.train.schedules import TrainingSchedules, apply_to_optimizer

MLM_DEFAULTS: dict[str, Any] = {
    "cache": None,
    "output": None,
    "text": {"path": None, "tiny": False},
    "iterations": 200,
    "batch_size": 16,
    "lr": 5e-5,
    "min_lr": 1e-6,
    "warmup_iterations": 20,
    "weight_decay": 0.01,
    "mask_probability": 0.15,
    "max_length": 256,
    "seed": 0,
    "checkpoint_every": 50,
    "keep_checkpoints": 2,
    "device": None,
    "train_split": "train",
    "val_split": "val",
    "resume": True,
    "progress": True,
    # precision: "auto" (bf16 autocast where bf16 is native, e.g. CUDA; fp32 elsewhere), "bf16", "fp32"
    "train": {"precision": "auto"},
}


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``(masked input ids, labels)`` with label ``-100`` on tokens not chosen.

    >>> ids, labels = mask_tokens(batch.input_ids, batch.attention_mask, tok, 0.15, torch.Generator().manual_seed(0))
    """
    special = torch.tensor(
        [[tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]], dtype=input_ids.dtype
    )
    can = attention_mask.bool() & ~(input_ids.unsqueeze(-1) == special.unsqueeze(0)).any(-1)
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & can
    # every sequence gets at least one target so no row is wasted
    none = ~chosen.any(1) & can.any(1)
    if none.any():
        first = can.float().argmax(1)
        chosen[none, first[none]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator, dtype=input_ids.dtype)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def report_ids(cache: PreparedCache, split: str | None, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of every non-empty report of ``split`` (``None``: every split)."""
    reports = [it.report for it in cache.items if it.report and (split is None or it.split == split)]
    return tokenize_reports(tokenizer, reports, max_length)


@torch.no_grad()
def perplexity(model, ids: Sequence[Sequence[int]], tokenizer, probability: float, device: torch.device,
               batch_size: int = 16, seed: int = 1234) -> float:
    """Masked-token perplexity of ``model`` on ``ids`` with a fixed masking seed (comparable across runs)."""
    if not ids:
        return float("nan")
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for s in range(0, len(ids), batch_size):
        batch = pad_token_ids(ids[s : s + batch_size], tokenizer.pad_token_id)
        masked, labels = mask_tokens(batch.input_ids, batch.attention_mask, tokenizer, probability, gen)
        logits = model(input_ids=masked.to(device), attention_mask=batch.attention_mask.to(device)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100, reduction="sum"
        )
        total += loss.double().cpu()
        count += (labels != -100).sum().double()
    model.train(was)
    # shards of the val set live on every rank only when the caller splits them; here all ranks see all
    return float(math.exp(total / count.clamp_min(1)))


def save_text_folder(model, tokenizer, dest: Path) -> None:
    """Write a loadable Hugging Face folder (safetensors + tokenizer) atomically (temp dir + rename)."""
    with atomic_folder(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def _architecture(model) -> dict[str, Any]:
    c = model.config
    return {k: getattr(c, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "intermediate_size", "max_position_embeddings")}


def train_mlm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run MLM pretraining from a config (see ``MLM_DEFAULTS``); returns the metrics written.

    >>> train_mlm(load_run_config("configs/text-demo.json", MLM_DEFAULTS, ["iterations=10"]))
    """
    return run_distributed(_train, cfg)


def _say(ctx, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def _train(cfg: dict[str, Any], ctx) -> dict[str, Any]:
    out = Path(cfg["output"])
    cache = PreparedCache(cfg["cache"])
    torch.manual_seed(int(cfg["seed"]))
    if not isinstance(cfg["text"], dict):
        cfg["text"] = {"path": cfg["text"]}
    model, tokenizer, folder = load_text_backbone(cfg["text"], masked_lm=True)
    model.to(ctx.device)
    max_length = int(cfg["max_length"])
    train_ids = report_ids(cache, cfg["train_split"], tokenizer, max_length)
    val_ids = report_ids(cache, cfg["val_split"], tokenizer, max_length)
    if not train_ids:
        raise ValueError(f"{cache.root}: no reports in split {cfg['train_split']!r} to pretrain on")
    _say(ctx, f"pretrain-text: {len(train_ids)} training reports, {len(val_ids)} held-out ({cfg['val_split']}), "
              f"text encoder from {folder}{' (tiny config)' if cfg['text'].get('tiny') else ''}, "
              f"world size {ctx.world_size}")
    if not val_ids:
        _say(ctx, f"pretrain-text: no reports in split {cfg['val_split']!r}; perplexity is not measured")
    prob = float(cfg["mask_probability"])
    iterations = int(cfg["iterations"])
    ppl_before = perplexity(model, val_ids, tokenizer, prob, ctx.device)

    sched = TrainingSchedules.build(iterations, lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]),
                                    warmup_iterations=int(cfg["warmup_iterations"]),
                                    weight_decay=float(cfg["weight_decay"]))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}],
                                  lr=float(cfg["lr"]), **adamw_options(ctx.device))
    precision = resolve_precision(ctx.device, {**MLM_DEFAULTS["train"], **(cfg.get("train") or {})}["precision"])
    configure_math(ctx.device)
    sampler = ResumableDistributedSampler(len(train_ids), seed=int(cfg["seed"]), rank=ctx.rank,
                                          world_size=ctx.world_size)
    ckpt_root = out / "checkpoints"
    arch = {"text": _architecture(model)}
    start = 0
    metrics: dict[str, Any] = {"perplexity_before": ppl_before}
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.get("resume", True) else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, {"text": model}, {"adamw": optimizer}, architecture=arch)
        start = int(state["iteration"])
        sampler.load_state_dict(state["sampler"])
        metrics["perplexity_before"] = ppl_before = state.get("perplexity_before", ppl_before)
        _say(ctx, f"pretrain-text: resumed from {latest} at iteration {start}")
    _say(ctx, f"pretrain-text: held-out perplexity before: {ppl_before:.2f}")

    per_rank = max(1, int(cfg["batch_size"]) // ctx.world_size)
    net = model
    if ctx.is_distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if ctx.device.type == "cpu" else [ctx.device])
    gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + ctx.rank + start)
    monitor = TrainingMonitor(out, total=iterations, start=start, enabled=ctx.is_main and cfg.get("progress", True),
                              desc="pretrain-text")
    stream = iter(sampler)
    model.train()
    try:
        for it in range(start, iterations):
            apply_to_optimizer(optimizer, **{k: v for k, v in sched.at(it).items() if k in ("lr", "weight_decay")})
            batch = pad_token_ids([train_ids[next(stream)] for _ in range(per_rank)], tokenizer.pad_token_id)
            masked, labels = mask_tokens(batch.input_ids, batch.attention_mask, tokenizer, prob, gen)
            with precision_context(ctx.device, precision):
                logits = net(input_ids=masked.to(ctx.device, non_blocking=True),
                             attention_mask=batch.attention_mask.to(ctx.device, non_blocking=True)).logits
            # the loss in fp32 outside autocast (HF's MLM loss: mean over the chosen tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     labels.to(ctx.device, non_blocking=True).flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            # the step's one host synchronisation: its scalars, averaged over ranks, fetched together
            shown = fetch_metrics({"loss": loss, "grad_norm": grad_norm})
            monitor.step(it + 1, {**shown, "lr": sched.at(it)["lr"]}, samples=per_rank * ctx.world_size)
            done = it + 1
            if done % int(cfg["checkpoint_every"]) == 0 or done == iterations:
                _checkpoint(ctx, ckpt_root, done, model, optimizer, tokenizer, sampler, arch, ppl_before, cfg)
    finally:
        monitor.close()
    ppl_after = perplexity(model, val_ids, tokenizer, prob, ctx.device)
    metrics.update({"perplexity_after": ppl_after, "iterations": iterations, "start_iteration": start,
                    "train_reports": len(train_ids), "val_reports": len(val_ids)})
    _say(ctx, f"pretrain-text: held-out perplexity after: {ppl_after:.2f} (before {ppl_before:.2f})")
    if ctx.is_main:
        save_text_folder(model, tokenizer, out / "text_encoder")
        atomic_write_json(out / "metrics.json", metrics)
        _say(ctx, f"pretrain-text: text encoder written to {out / 'text_encoder'}")
    barrier()
    return metrics


def _checkpoint(ctx, root: Path, iteration: int, model, optimizer, tokenizer, sampler, arch, ppl_before, cfg) -> None:
    if not ctx.is_main:
        barrier()
        return
    # the sampler has already yielded this iteration's items, so its position is the next batch
    path = ckpt.save_checkpoint(root, iteration, {"text": model}, {"adamw": optimizer},
                                {"sampler": sampler.state_dict(), "perplexity_before": ppl_before,
                                 "config": {k: v for k, v in cfg.items() if k != "progress"}},
                                architecture=arch, keep=int(cfg["keep_checkpoints"]))
    save_text_folder(model, tokenizer, path / "text_encoder")
    barrier()


