"""Stage-1 pretraining on the prepared demo cache (real MRI): learning, exact resume after SIGTERM,
two-process DDP equals one process, refused checkpoints, teacher export.

Tiny model (vit-micro), small crops and fixed seeds keep this file to about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from decipher_mr.models import load_vision_encoder
from decipher_mr.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from decipher_mr.train.ssl.trainer import load_config, train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "DecipherMRTraining" / "configs" / "vit-small-demo.json"
TINY = [
    "model.encoder=vit-micro", "model.dino_prototypes=64", "model.ibot_prototypes=64",
    "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "model.head_layers=2",
    'crops.global_size=[32,32,16]', 'crops.local_size=[16,16,8]', "crops.n_local=2",
    "train.batch_size=4", "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_iterations=2", "optim.teacher_temp_warmup_iterations=0", "optim.teacher_temp=0.04",
    "train.monitor_every=0",
]


def tiny_config(cache: Path, run_dir: Path, *more: str) -> dict:
    return load_config(CONFIG, [f"data.cache={cache}", f"run_dir={run_dir}", *TINY, *more])


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["iteration"]: r for r in rows}


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "weights.safetensors"))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "DecipherMRTraining") + os.pathsep + env.get("PYTHONPATH", "")
    # Same thread count as this process: results are then reproducible bit for bit across processes.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def test_loss_goes_down_on_the_demo_cache(prepared_demo_cache, tmp_path):
    # Sinkhorn-Knopp targets are informative from the first step (centering starts near uniform
    # targets, so its loss first rises, as in DINO), which makes learning visible in 40 steps.
    cfg = tiny_config(prepared_demo_cache, tmp_path / "run", "train.iterations=40", "optim.lr=2e-3",
                      "loss.centering=sinkhorn", "masking.sample_probability=1.0", "masking.ratio=[0.3,0.3]",
                      "optim.teacher_momentum_end=0.99", "train.checkpoint_every=100")
    summary = train(cfg)
    losses = np.array(summary["losses"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean() - 0.1, losses
    assert (tmp_path / "run" / "encoder.safetensors").exists()


def _wait_for_iterations(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.exists() and len(f.read_text(encoding="utf-8").splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError("training did not reach the wanted iteration in time")


def test_sigterm_checkpoint_then_resume_equals_an_uninterrupted_run(prepared_demo_cache, tmp_path):
    common = ["train.iterations=1000", "train.checkpoint_every=1000", "optim.lr=1e-3", "loss.centering=centering"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "decipher_mr", "pretrain-vision", "--config", str(CONFIG),
           f"data.cache={prepared_demo_cache}", f"run_dir={killed}", *TINY, *common]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    _wait_for_iterations(killed, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped cleanly" in out
    ckpt = latest_checkpoint(killed / "checkpoints")
    stopped = int(ckpt.name.split("-")[1])
    assert stopped >= 3

    target = stopped + 3
    resumed = train(tiny_config(prepared_demo_cache, killed, *common, f"train.stop_at={target}"), resume=True)
    assert resumed["start"] == stopped and len(resumed["losses"]) == 3

    straight_dir = tmp_path / "straight"
    train(tiny_config(prepared_demo_cache, straight_dir, *common, f"train.stop_at={target}"))
    a, b = metrics(killed), metrics(straight_dir)
    assert sorted(a) == sorted(b) == list(range(target))
    for it in range(target):
        assert a[it]["loss"] == pytest.approx(b[it]["loss"], rel=1e-5, abs=1e-6), it
    wa, wb = weights_of(killed), weights_of(straight_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(prepared_demo_cache, tmp_path):
    # KoLeo looks for nearest neighbours within each process's batch, so it differs by design.
    common = ["train.iterations=4", "train.checkpoint_every=100", "optim.lr=1e-3", "loss.koleo_weight=0",
              "train.export_teacher=false"]
    ddp_dir = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "decipher_mr", "pretrain-vision", "--config", str(CONFIG),
                f"data.cache={prepared_demo_cache}", f"run_dir={ddp_dir}", "device=cpu", *TINY, *common]
    res = subprocess.run(torchrun, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout

    single_dir = tmp_path / "single"
    summary = train(tiny_config(prepared_demo_cache, single_dir, *common, "device=cpu"))
    assert summary["world_size"] == 1
    # The noise floor, measured here: the same single-process run with another thread count sums in
    # another order, which changes nothing but float32 rounding. AdamW turns rounding noise in gradients
    # that are zero in exact arithmetic (the key bias: softmax ignores a per-row shift) into steps of about
    # lr, so after the first real step runs agree only to that floor, on any machine. DDP must stay within
    # ten times it (measured: 3 to 4.5 times); a DDP run with a 5% larger lr is about 30 times it, and a
    # wrong gradient average or loss normalisation is far above that.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        reordered_dir = tmp_path / "reordered"
        train(tiny_config(prepared_demo_cache, reordered_dir, *common, "device=cpu"))
    finally:
        torch.set_num_threads(threads)
    a, b, c = metrics(ddp_dir), metrics(single_dir), metrics(reordered_dir)
    for it in range(4):
        floor = abs(c[it]["loss"] - b[it]["loss"])
        assert abs(a[it]["loss"] - b[it]["loss"]) <= 10 * floor + 1e-5, (it, a[it]["loss"], b[it]["loss"], floor)
    wa, wb, wc = weights_of(ddp_dir), weights_of(single_dir), weights_of(reordered_dir)
    assert wa.keys() == wb.keys() == wc.keys()
    ddp_gap = torch.sqrt(sum(((wa[k] - wb[k]).double() ** 2).sum() for k in wa))
    noise = torch.sqrt(sum(((wc[k] - wb[k]).double() ** 2).sum() for k in wa))
    assert ddp_gap <= 10 * noise + 1e-5, (float(ddp_gap), float(noise))


def _torchrun_stage1(run_dir: Path, cache: Path, *more: str, nproc: int = 2, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "decipher_mr", "pretrain-vision", "--config", str(CONFIG),
            f"data.cache={cache}", f"run_dir={run_dir}", "device=cpu", *TINY, *more, *(["--resume"] if resume else [])]


def test_a_two_process_run_with_a_killed_process_resumes_to_the_uninterrupted_weights(prepared_demo_cache, tmp_path):
    # A node that dies takes its processes with it: SIGKILL one rank, the run stops, the same command with
    # --resume continues from the last checkpoint and ends where an uninterrupted run ends.
    import psutil

    common = ["train.iterations=1000", "train.checkpoint_every=2", "train.keep_checkpoints=100", "optim.lr=1e-3",
              "loss.koleo_weight=0", "train.export_teacher=false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_stage1(killed, prepared_demo_cache, *common), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    try:
        deadline = time.monotonic() + 240
        while (latest_checkpoint(killed / "checkpoints") if (killed / "checkpoints").is_dir() else None) is None or \
                int(latest_checkpoint(killed / "checkpoints").name.split("-")[1]) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "the 2-process run did not reach a checkpoint"
            time.sleep(0.1)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "RANK" in p.environ()}
        ranks["1"].kill()
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode != 0  # the run did stop
    stopped = int(latest_checkpoint(killed / "checkpoints").name.split("-")[1])
    target = stopped + 2
    res = subprocess.run(_torchrun_stage1(killed, prepared_demo_cache, *common, f"train.stop_at={target}", resume=True),
                         env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from" in res.stderr and f"trained iterations {stopped}..{target}" in res.stdout, res.stdout

    straight = tmp_path / "straight"
    res = subprocess.run(_torchrun_stage1(straight, prepared_demo_cache, *common, f"train.stop_at={target}"),
                         env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    wa, wb = weights_of(killed), weights_of(straight)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_stage1_step_syncs_with_the_host_once(prepared_demo_cache, tmp_path, monkeypatch):
    from sync_counter import syncs_per_step

    cfg = tiny_config(prepared_demo_cache, tmp_path / "run", "train.iterations=4", "train.checkpoint_every=100",
                      "train.monitor_every=0", "train.export_teacher=false", "device=cpu")
    per_step = syncs_per_step(train, cfg, monkeypatch)
    assert len(per_step) == 3 and max(per_step) == 1, per_step


def test_one_process_under_torchrun_trains_in_a_process_group(prepared_demo_cache, tmp_path):
    # `torchrun --nproc_per_node=1` on one GPU must go through NCCL and DDP like a multi-GPU run (a crash
    # of a collective then shows on the first single-GPU run); plain python makes no group.
    run_dir = tmp_path / "torchrun-1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "decipher_mr", "pretrain-vision", "--config", str(CONFIG),
                f"data.cache={prepared_demo_cache}", f"run_dir={run_dir}", "device=cpu", *TINY, "train.iterations=2",
                "train.export_teacher=false"]
    res = subprocess.run(torchrun, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 process(es), gloo" in res.stdout, res.stdout
    summary = train(tiny_config(prepared_demo_cache, tmp_path / "plain", "train.iterations=1", "train.export_teacher=false",
                                "device=cpu"))
    assert summary["backend"] is None


@pytest.fixture(scope="module")
def short_run(prepared_demo_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("short") / "run"
    train(tiny_config(prepared_demo_cache, run_dir, "train.iterations=2", "train.checkpoint_every=2"))
    return run_dir


def test_corrupt_checkpoint_is_refused_naming_the_file(short_run, prepared_demo_cache, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(short_run, bad)
    weights = latest_checkpoint(bad / "checkpoints") / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: checksum mismatch"):
        train(tiny_config(prepared_demo_cache, bad, "train.iterations=4"), resume=True)


def test_checkpoint_of_another_architecture_is_refused(short_run, prepared_demo_cache, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(short_run, other)
    cfg = tiny_config(prepared_demo_cache, other, "train.iterations=4", 'model.encoder_overrides={"depth": 3}')
    with pytest.raises(CheckpointError, match="another architecture.*depth"):
        train(cfg, resume=True)


def test_teacher_export_from_the_command_line_loads_as_an_encoder(short_run, tmp_path):
    out = tmp_path / "teacher.safetensors"
    res = subprocess.run([sys.executable, "-m", "decipher_mr", "pretrain-vision", "--export-teacher", str(short_run),
                          "--out", str(out)], env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert res.returncode == 0, res.stderr
    enc = load_vision_encoder(out)
    teacher = {k[len("teacher.backbone."):]: v for k, v in weights_of(short_run).items() if k.startswith("teacher.backbone.")}
    for k, v in enc.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["embed_dim"] == 64


def test_multicrop_views_have_the_configured_sizes_and_depend_only_on_the_key(prepared_demo_cache):
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.train.ssl.multicrop import MultiCropConfig, MultiCropDataset, collate_multicrop

    cache = PreparedCache(prepared_demo_cache)
    # The global crop has more slices than any demo volume (at 3 mm): the crop takes the whole depth and is
    # resampled to 96 slices (crop extents are in mm; see test_crops_geometry.py).
    cfg = MultiCropConfig(global_size=(32, 32, 96), local_size=(16, 16, 8), n_local=3)
    ds = MultiCropDataset(cache, None, cfg, seed=0)
    a, again, other = ds[(0, 17)], ds[(0, 17)], ds[(0, 18)]
    assert a["global"].shape == (2, 1, 32, 32, 96) and a["local"].shape == (3, 1, 16, 16, 8)
    assert a["masks"].shape == (2, 4 * 4 * 12) and a["masks"].dtype == torch.bool
    assert torch.equal(a["global"], again["global"]) and torch.equal(a["masks"], again["masks"])
    assert not torch.equal(a["global"], other["global"])
    batch = collate_multicrop([a, other])
    assert batch["global"].shape == (4, 1, 32, 32, 96)
    assert torch.equal(batch["global"][1], other["global"][0])  # crop-major: view 0 of every sample first


def test_block_masks_hit_the_ratio_on_flat_mri_grids():
    from decipher_mr.train.ssl.masking import block_mask

    rng = np.random.default_rng(0)
    for grid in [(32, 32, 3), (8, 8, 2), (4, 4, 1)]:
        for ratio in (0.1, 0.3, 0.5):
            m = block_mask(grid, ratio, rng)
            assert abs(m.mean() - ratio) <= 0.1 + 1 / m.size, (grid, ratio, m.mean())


def test_a_damaged_cache_item_is_skipped_with_a_warning_naming_it(prepared_demo_cache, tmp_path):
    from decipher_mr.data.cache import PreparedCache
    from decipher_mr.train.ssl.multicrop import MultiCropConfig, MultiCropDataset

    cache_copy = tmp_path / "cache"
    shutil.copytree(prepared_demo_cache, cache_copy)
    cache = PreparedCache(cache_copy)
    damaged = cache_copy / cache.items[0].array
    damaged.write_bytes(b"\x93NUMPY garbage")
    ds = MultiCropDataset(cache, None, MultiCropConfig(global_size=(32, 32, 16), local_size=(16, 16, 8), n_local=1))
    with pytest.warns(RuntimeWarning, match=damaged.name):
        views = ds[(0, 0)]
    assert views["global"].shape == (2, 1, 32, 32, 16)


def test_repeated_non_finite_steps_abort_with_a_clear_message(prepared_demo_cache, tmp_path):
    cfg = tiny_config(prepared_demo_cache, tmp_path / "run", "train.iterations=20", "optim.lr=1e30",
                      "optim.warmup_iterations=0", "optim.clip_grad=0", "train.max_nan_in_a_row=3",
                      "train.checkpoint_every=100")
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient"):
        train(cfg)


# ---------------------------------------------------------------------------------------------
# losses, optimiser groups, freezing and clipping as in DINOv2 (issue 13, defects 4 and 5)

MICRO_HEADS = (64, 64, 64, 32, 2)  # the heads of TINY


def _micro_arch(**loss):
    from decipher_mr.models.vit3d import vision_config
    from decipher_mr.train.ssl.meta_arch import HeadConfig, SSLMetaArch

    torch.manual_seed(0)
    return SSLMetaArch(vision_config("vit-micro"), HeadConfig(*MICRO_HEADS), loss)


def _random_batch(b: int = 4, n_local: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2 * b, 4 * 4 * 2, generator=g) < 0.3  # vit-micro: 8^3 patches of a 32x32x16 crop
    return {"global": torch.randn(2 * b, 1, 32, 32, 16, generator=g), "local": torch.randn(n_local * b, 1, 16, 16, 8, generator=g),
            "masks": masks}


def test_koleo_term_is_the_sum_over_the_two_global_crops():
    from decipher_mr.train.ssl.losses import KoLeoLoss

    arch = _micro_arch(koleo_weight=0.1)
    arch.eval()  # no drop path: the student pass below is the one inside training_loss
    batch = _random_batch()
    with torch.no_grad():
        loss, metrics = arch.training_loss(batch, teacher_temp=0.04)
        cls = arch.student(batch["global"], batch["local"], batch["masks"])["cls_global"]
    per_crop = [float(KoLeoLoss()(c)) for c in cls.chunk(2)]
    assert min(abs(v) for v in per_crop) > 1e-3  # the sum and the mean differ here
    assert float(metrics["loss/koleo"]) == pytest.approx(sum(per_crop), rel=1e-5)
    expected = float(metrics["loss/dino"]) + float(metrics["loss/ibot"]) + 0.1 * sum(per_crop)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_param_groups_follow_dinov2_layer_decay_patch_embed_and_weight_decay():
    arch = _micro_arch()
    depth = len(arch.student.backbone.blocks)
    groups = arch.param_groups(layer_decay=0.9, patch_embed_lr_mult=0.2)
    where = {}
    for g in groups:
        for name in g["names"]:
            assert name not in where, name
            where[name] = (g["lr_scale"], g["wd_scale"], g["last_layer"])
    assert set(where) == {n for n, p in arch.student.named_parameters() if p.requires_grad}
    emb = 0.9 ** (depth + 1)
    approx = lambda v: pytest.approx(v, rel=1e-9)  # noqa: E731
    # the class token's position embedding is an embedding, exactly like pos_embed
    for name in ("cls_pos", "pos_embed", "cls_token", "mask_token"):
        assert where[f"backbone.{name}"] == (approx(emb), 0.0, False), name
    assert where["backbone.patch_embed.weight"] == (approx(0.2 * emb), 1.0, False)
    assert where["backbone.patch_embed.bias"] == (approx(0.2 * emb), 0.0, False)
    for i in range(depth):
        scale = 0.9 ** (depth - i)
        assert where[f"backbone.blocks.{i}.attn.qkv.weight"] == (approx(scale), 1.0, False)
        assert where[f"backbone.blocks.{i}.mlp.fc1.bias"] == (approx(scale), 0.0, False)
        assert where[f"backbone.blocks.{i}.norm1.weight"] == (approx(scale), 0.0, False)
    assert where["backbone.norm.weight"] == (1.0, 0.0, False)
    for head in ("dino_head", "ibot_head"):
        assert where[f"{head}.mlp.0.weight"] == (1.0, 1.0, False)
        assert where[f"{head}.mlp.0.bias"] == (1.0, 0.0, False)
        assert where[f"{head}.prototypes"] == (1.0, 1.0, True)


def test_gradients_are_clipped_per_part_not_jointly():
    arch = _micro_arch()
    parts = arch.student_parts()
    wanted = {"backbone": 10.0, "dino_head": 1.0, "ibot_head": 0.5}
    for name, part in parts.items():
        params = list(part.parameters())
        n = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.full_like(p, wanted[name] / n ** 0.5)
    joint = torch.nn.utils.get_total_norm([p.grad for p in arch.student.parameters()])
    assert 3.0 / float(joint) < 0.5  # a joint clip to 3 would shrink the heads' gradients too
    norms = arch.clip_gradients(3.0)
    for name, part in parts.items():
        assert float(norms[name]) == pytest.approx(wanted[name], rel=1e-4)
        after = float(torch.nn.utils.get_total_norm([p.grad for p in part.parameters()]))
        assert after == pytest.approx(min(wanted[name], 3.0), rel=1e-4), name


def test_prototypes_stay_frozen_for_the_configured_iterations_then_move(prepared_demo_cache, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(prepared_demo_cache, run, "train.iterations=4", "train.checkpoint_every=1",
                      "train.keep_checkpoints=10", "optim.lr=1e-3", "optim.freeze_last_layer_iterations=2",
                      "train.export_teacher=false"))
    w = {i: load_file(str(run / "checkpoints" / f"ckpt-{i:08d}" / "weights.safetensors")) for i in range(1, 5)}
    init = _micro_arch().student.state_dict()
    for head in ("dino_head", "ibot_head"):
        key = f"student.{head}.prototypes"
        assert torch.equal(w[1][key], init[f"{head}.prototypes"]) and torch.equal(w[2][key], w[1][key]), head
        # the teacher's EMA of an unchanged student changes nothing but the rounding
        torch.testing.assert_close(w[2][f"teacher.{head}.prototypes"], init[f"{head}.prototypes"], rtol=0, atol=1e-8)
        assert not torch.equal(w[3][key], w[2][key]) and not torch.equal(w[4][key], w[3][key]), head
        # the rest of the head (and the backbone) trains during the freeze
        assert not torch.equal(w[2][f"student.{head}.mlp.0.weight"], w[1][f"student.{head}.mlp.0.weight"])
    assert not torch.equal(w[2]["student.backbone.blocks.0.attn.qkv.weight"], w[1]["student.backbone.blocks.0.attn.qkv.weight"])
    rows = metrics(run)
    assert [rows[i]["last_layer_frozen"] for i in range(4)] == [True, True, False, False]
    for i in range(4):  # each part is clipped on its own; grad_norm is the whole gradient's norm
        parts = [rows[i][f"grad_norm/{p}"] for p in ("backbone", "dino_head", "ibot_head")]
        assert rows[i]["grad_norm"] == pytest.approx(sum(v * v for v in parts) ** 0.5, rel=1e-6)
    # the trainer's optimiser uses those groups (saved with the checkpoint)
    state = json.loads((run / "checkpoints" / "ckpt-00000004" / "trainer_state.json").read_text(encoding="utf-8"))
    groups = state["optimizers"]["adamw"]["param_groups"]
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.cls_pos"]["wd_scale"] == 0.0
    assert by_name["backbone.cls_pos"]["lr_scale"] == pytest.approx(by_name["backbone.pos_embed"]["lr_scale"])
    assert by_name["backbone.patch_embed.weight"]["lr_scale"] == pytest.approx(0.2 * by_name["backbone.pos_embed"]["lr_scale"])
    assert by_name["dino_head.prototypes"]["last_layer"] is True
