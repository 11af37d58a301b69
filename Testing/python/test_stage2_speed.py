"""Stage-2 (align) and text-MLM speed work of issue 13, as far as a CPU can check it.

* precision: ``train.precision`` (bf16 autocast in the towers, the CLIP loss in fp32), and GradCache
  under bf16: the replayed chunk forwards give bit-identical features to the cached ones.
* AdamW: fused on CUDA, foreach elsewhere (only the option choice is checked here: there is no CUDA).
* ``train.compile``: two align iterations with compiled towers give the loss of eager ones.
* images: DataLoader workers, float32 augmentation (no float64 temporaries), fp16 transfer, the same
  batches for any number of workers and on resume.
* host syncs: at most one per step (see :class:`SyncCounter` for how this is counted on a CPU).
* DDP: with 2 gloo processes, GradCache's chunks under ``no_sync`` except the last give the
  single-process gradients of the whole batch, and DDP reduces buckets during the last chunk's backward.

What only a GPU can show: that bf16 is faster and fits larger chunks, that TF32/fused AdamW are used
by the kernels, that compute overlaps communication in time, the real cost of a host sync, and
pinned-memory transfers.
"""

from __future__ import annotations

import json
import math
import socket
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from brain_pairs import build_brain_pairs
from sync_counter import SyncCounter, syncs_per_step
from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.sampling import RegionBatchSampler
from decipher_mr.models.clip import ImageTextModel
from decipher_mr.models.text import TextTower
from decipher_mr.models.vit3d import build_vision_encoder
from decipher_mr.train import align as align_mod
from decipher_mr.train.align import (
    ALIGN_DEFAULTS,
    AlignBatches,
    TextSide,
    TowerForward,
    augment_intensity,
    clip_step,
    train_align,
)
from decipher_mr.train.clip_loss import ClipLoss
from decipher_mr.train.mlm import MLM_DEFAULTS, train_mlm
from decipher_mr.train.run_config import load_run_config
from decipher_mr.train.runtime import adamw_options

REPO = Path(__file__).resolve().parents[2]
VIEW = {"size": [32, 40, 32], "mode": "resize", "augment": True}
CROP = {"size": [24, 24, 24], "mode": "crop", "augment": True}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return build_brain_pairs(tmp_path_factory.mktemp("pairs"), n_train=12, n_val=2, n_test=2)


def align_cfg(pairs: Path, out: Path, *extra: str) -> dict:
    return load_run_config(REPO / "DecipherMRTraining/configs/align-demo.json", ALIGN_DEFAULTS, [
        f"cache={pairs}", f"output={out}", "iterations=3", "checkpoint_every=100", "progress=false",
        'text_trainable="frozen"', "batch_size=4", "chunks=2", f"image={json.dumps(VIEW)}",
        'vision={"preset": "vit-micro"}', 'vision_trainable="all"', "device=cpu", "data.num_workers=0", *extra])


def mlm_cfg(pairs: Path, out: Path, *extra: str) -> dict:
    return load_run_config(REPO / "DecipherMRTraining/configs/text-tiny.json", MLM_DEFAULTS, [
        f"cache={pairs}", f"output={out}", "iterations=3", "checkpoint_every=100", "progress=false",
        "batch_size=4", "device=cpu", *extra])


def tiny_model() -> ImageTextModel:
    torch.manual_seed(0)
    return ImageTextModel(build_vision_encoder("vit-micro"), TextTower.from_spec({"tiny": True}))


# ---------------------------------------------------------------------------------------------
# precision


class RecordingTowers(TowerForward):
    """TowerForward that keeps every forward's outputs and the dtype inside the image tower."""

    def __init__(self, model):
        super().__init__(model)
        self.outputs, self.dtypes = [], []
        model.vision.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: self.dtypes.append(out.dtype))

    def forward(self, images, *text_inputs):
        img, txt = super().forward(images, *text_inputs)
        self.outputs.append((img.detach().clone(), txt.detach().clone()))
        return img, txt


def test_bf16_gradcache_replays_the_cached_features_exactly_and_keeps_the_loss_in_fp32():
    idx = list(range(6))
    images = torch.randn(6, 1, 32, 40, 32, generator=torch.Generator().manual_seed(1))
    reports = ["Brain. Normal study.", "Brain. Small infarct.", "Knee. Effusion.", "Spine. Disc bulge.",
               "Brain. Glioma in the left frontal lobe.", "Abdomen. Hepatic cyst."]
    # GradCache with 3 chunks under bf16
    model = tiny_model().eval()
    text = TextSide(model, reports, torch.device("cpu"), precompute=False)
    towers = RecordingTowers(model)
    loss, img, txt = clip_step(model, ClipLoss(), images, text, idx, chunks=3, precision="bf16", towers=towers)
    assert set(towers.dtypes) == {torch.bfloat16}  # the towers ran under bf16 autocast
    assert loss.dtype == img.dtype == txt.dtype == torch.float32
    # the loss is the fp32 CLIP loss of the fp32 features (not a bf16 product)
    assert torch.equal(loss, ClipLoss()(img, txt, model.scale().detach()))
    cached, replayed = towers.outputs[:3], towers.outputs[3:]
    assert len(replayed) == 3
    for (ci, ct), (ri, rt) in zip(cached, replayed):  # bit-identical: the gradients are those of the cache
        assert torch.equal(ci, ri) and torch.equal(ct, rt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the non-cached path under the same precision: the same chunk forwards (autocast per chunk),
    # the fp32 loss of all of them, one backward
    ref = tiny_model().eval()
    ref_text = TextSide(ref, reports, torch.device("cpu"), precompute=False)
    parts = []
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            i, t = TowerForward(ref)(images[rows], *ref_text.inputs(idx[rows]))
        parts.append((i.float(), t.float()))
    ref_img, ref_txt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    ref_loss = ClipLoss()(ref_img, ref_txt, ref.scale())
    ref_loss.backward()
    assert torch.equal(img, ref_img.detach()) and torch.equal(txt, ref_txt.detach())
    torch.testing.assert_close(loss, ref_loss.detach())
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def _dtypes_seen(cfg: dict, run) -> set:
    """Output dtypes of every Linear layer in a training forward (grad on, train mode) of a run."""
    seen: set = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.add(out.dtype) if isinstance(m, torch.nn.Linear) and m.training and torch.is_grad_enabled() else None)
    try:
        run(cfg)
    finally:
        hook.remove()
    return seen


def test_align_and_mlm_run_the_training_forward_in_bf16_when_asked(pairs, tmp_path):
    seen = _dtypes_seen(align_cfg(pairs, tmp_path / "a", "train.precision=bf16", "iterations=2"), train_align)
    assert torch.bfloat16 in seen
    seen = _dtypes_seen(mlm_cfg(pairs, tmp_path / "m", "train.precision=bf16", "iterations=2"), train_mlm)
    assert seen == {torch.bfloat16}
    # fp32 stays fp32
    seen = _dtypes_seen(mlm_cfg(pairs, tmp_path / "m32", "train.precision=fp32", "iterations=2"), train_mlm)
    assert seen == {torch.float32}


# ---------------------------------------------------------------------------------------------
# AdamW


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere(pairs, tmp_path, monkeypatch):
    assert adamw_options(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_options("cpu") == {"foreach": True}
    made: list[dict] = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    train_align(align_cfg(pairs, tmp_path / "a", "iterations=1"))
    train_mlm(mlm_cfg(pairs, tmp_path / "m", "iterations=1"))
    assert len(made) == 2 and all(kw.get("foreach") is True for kw in made), made


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compile_works() -> str | None:
    """None when torch.compile (inductor, which needs a C compiler) works here, else why not."""
    import shutil

    if not any(shutil.which(cc) for cc in ("gcc", "cc", "clang")):
        return "no C compiler: torch.compile's inductor backend cannot build kernels"
    try:
        fn = torch.compile(lambda x: (x * 2).sin())
        torch.testing.assert_close(fn(torch.ones(3)), (torch.ones(3) * 2).sin())
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile does not work on this machine: {type(exc).__name__}: {exc}"
    return None


def test_compiled_towers_give_the_loss_of_eager_towers(pairs, tmp_path):
    why = _compile_works()
    if why:
        pytest.skip(why)
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # chunks=1 and one batch shape keep compilation to one graph per grad mode (about half a minute)
    extra = ("iterations=2", "chunks=1", "train.precision=fp32", "batch_size=4")
    eager = train_align(align_cfg(pairs, tmp_path / "eager", *extra))
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train_align(align_cfg(pairs, tmp_path / "compiled", *extra, "train.compile=true"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the towers really were compiled
    # iteration 2's loss depends on iteration 1's compiled forward, backward and update
    assert math.isclose(compiled["final_loss"], eager["final_loss"], rel_tol=1e-4, abs_tol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# image loading


def _loader(pairs: Path, workers: int, start: int, stop: int, image_cfg=CROP):
    cache = PreparedCache(pairs)
    items = [i for i in cache.indices(split="train") if cache.items[i].report]
    sampler = RegionBatchSampler([cache.items[i].body_region for i in items], 4, seed=5)
    data = AlignBatches(cache, items, sampler, image_cfg, seed=5)
    return sampler, torch.utils.data.DataLoader(data, sampler=range(start, stop), batch_size=None, num_workers=workers,
                                                prefetch_factor=2 if workers else None)


def test_worker_batches_are_fp16_and_the_same_for_any_worker_count_and_on_resume(pairs):
    sampler, serial = _loader(pairs, 0, 0, 6)
    batches = list(serial)
    _, parallel = _loader(pairs, 2, 0, 6)
    _, resumed = _loader(pairs, 2, 3, 6)
    stream = sampler.stream(0)
    for it, (local, images) in enumerate(batches):
        assert local == next(stream)  # the sampler's order, batch by batch
        assert images.dtype == torch.float16 and images.shape == (len(local), 1, 24, 24, 24)
    for (la, a), (lb, b) in zip(batches, parallel, strict=True):
        assert la == lb and torch.equal(a, b)
    for (la, a), (lb, b) in zip(batches[3:], resumed, strict=True):
        assert la == lb and torch.equal(a, b)
    assert not torch.equal(batches[0][1][0], batches[1][1][0])  # augmentation differs per iteration


def test_augmentation_is_float32_without_float64_temporaries():
    volume = np.random.default_rng(0).standard_normal((64, 64, 64), dtype=np.float32)
    rng = np.random.default_rng(1)
    tracemalloc.start()
    try:
        out = augment_intensity(volume, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32
    # float32 result + float32 noise = 2 volumes; float64 noise and a float64 sum would be >= 5
    assert peak < 2.5 * volume.nbytes, peak / volume.nbytes


# ---------------------------------------------------------------------------------------------
# host synchronisations


def test_the_sync_counter_sees_the_syncs_it_is_meant_to():
    with SyncCounter() as counter:
        x = torch.ones(3).to(torch.device("cpu"))
        y = (x * 2).sum()
        float(y)
        y.item()
        (x > 0).tolist()
        x[x > 1]
        x.to("cpu", non_blocking=True)
        host = torch.ones(3)
        float(host.sum())  # host tensors do not count
    assert counter.syncs == ["__float__", "item", "tolist", "__getitem__"], counter.syncs


def test_an_align_step_syncs_with_the_host_once(pairs, tmp_path, monkeypatch):
    # 10 iterations: the 10th also reports the effective ranks of the embeddings
    cfg = align_cfg(pairs, tmp_path / "a", "iterations=10", "chunks=2", "text_trainable=\"all\"")
    per_step = syncs_per_step(train_align, cfg, monkeypatch)
    assert len(per_step) == 9 and max(per_step) == 1, per_step


def test_an_mlm_step_syncs_with_the_host_once(pairs, tmp_path, monkeypatch):
    per_step = syncs_per_step(train_mlm, mlm_cfg(pairs, tmp_path / "m", "iterations=4"), monkeypatch)
    assert len(per_step) == 3 and max(per_step) == 1, per_step


# ---------------------------------------------------------------------------------------------
# DDP with GradCache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPORTS = ["Brain. Normal study.", "Brain. Small infarct.", "Knee. Effusion.", "Spine. Disc bulge.",
           "Brain. Glioma in the left frontal lobe.", "Abdomen. Hepatic cyst.", "Brain. Old lacune.", "Knee. ACL tear."]


def _batch() -> torch.Tensor:
    return torch.randn(len(REPORTS), 1, 32, 40, 32, generator=torch.Generator().manual_seed(3))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from decipher_mr.train.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu")
    torch.set_num_threads(1)
    model = tiny_model().eval()  # no dropout: compare the arithmetic
    text = TextSide(model, REPORTS, ctx.device, precompute=False)
    share = len(REPORTS) // world
    rows = list(range(rank * share, (rank + 1) * share))
    probe = torch.zeros(1, 1, 32, 40, 32)
    towers = align_mod.wrap_towers(model, ctx, probe, text.inputs([0]))
    assert isinstance(towers, torch.nn.parallel.DistributedDataParallel)
    # record when DDP reduces a bucket: during which chunk's backward
    phase = {"chunk": None}
    reduced: list = []

    def hook(state, bucket):
        reduced.append(phase["chunk"])
        return default_hooks.allreduce_hook(None, bucket)

    towers.register_comm_hook(None, hook)
    real_backward = torch.autograd.backward
    calls = {"n": 0}

    def backward(*a, **k):
        phase["chunk"] = calls["n"]
        calls["n"] += 1
        try:
            return real_backward(*a, **k)
        finally:
            phase["chunk"] = None

    align_mod.torch.autograd.backward = backward
    loss, _, _ = clip_step(model, ClipLoss(), _batch()[rows], text, rows, chunks=2, towers=towers)
    align_mod.torch.autograd.backward = real_backward
    align_mod.average_gradients([model.logit_scale])
    shutdown_distributed()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "loss": float(loss), "reduced": reduced, "backwards": calls["n"],
        "grads": {n: p.grad.flatten().tolist() for n, p in model.named_parameters() if p.grad is not None}}))


def test_two_process_ddp_gradcache_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    model = tiny_model().eval()
    text = TextSide(model, REPORTS, torch.device("cpu"), precompute=False)
    loss, _, _ = clip_step(model, ClipLoss(), _batch(), text, list(range(len(REPORTS))), chunks=1)
    assert math.isclose((r0["loss"] + r1["loss"]) / 2, float(loss), rel_tol=1e-5)
    # backward 0 is the loss's (feature gradients), 1 and 2 the two chunks': DDP's buckets are reduced
    # only during the last chunk's backward (overlapping its compute), never in the first chunk's
    # (no_sync), never outside a backward
    for r in (r0, r1):
        assert r["backwards"] == 3 and r["reduced"] and set(r["reduced"]) == {2}, r["reduced"]
    grads = {n: p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None}
    assert r0["grads"].keys() == grads.keys() == r1["grads"].keys() and len(grads) > 10
    for name, g in grads.items():
        for r in (r0, r1):
            torch.testing.assert_close(torch.tensor(r["grads"][name]), g, atol=1e-6, rtol=1e-4, msg=name)
