"""Testing/bench/gpu_bench.py cannot rot: its --cpu-smoke mode runs end to end on the CPU, as the GPU
machine would see the code (monai, SimpleITK, nibabel and faiss made unimportable), starts a real
process group under torchrun, and writes every figure the GPU run writes; its MONAI stand-in
(RefViT) computes what MONAI's ViT computes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "Testing" / "bench" / "gpu_bench.py"
BLOCKED = ("monai", "SimpleITK", "nibabel", "faiss")  # not installed on the GPU machine


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bench")
    block = tmp / "block"
    for name in BLOCKED:  # shadow the installed packages: importing one raises, as on the GPU machine
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f'raise ImportError("{name} is not installed on the GPU machine")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), str(REPO / "DecipherMRTraining")])
    env.pop("OUT", None)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    return proc, out / "gpu_bench.json"


def test_cpu_smoke_runs_end_to_end(smoke):
    proc, path = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert path.is_file()
    assert "CPU smoke: figures are meaningless" in proc.stdout
    assert "MONAI not installed here" in proc.stdout  # says so, and uses the stand-in


def test_json_has_every_key(smoke):
    _, path = smoke
    r = json.loads(path.read_text(encoding="utf-8"))
    assert r["mode"] == "cpu-smoke" and r["errors"] == {}
    for key in ("torch", "device_name", "data", "goals", "torchrun_command", "torchrun_exit", "process_group",
                "peak_bf16", "stage1", "stage2", "encoder", "trainer_smoke", "align_smoke", "phase_s", "elapsed_s",
                "blocked_modules_loaded"):
        assert key in r, key
    assert r["goals"] == {"stage1_mfu": 0.4, "encoder_speedup_bf16": 3.0}
    assert r["peak_bf16"]["tflops"] > 0
    s1 = r["stage1"]
    for key in ("encoder", "batch_per_gpu", "global_size", "local_size", "n_local", "precision", "ddp", "step_s",
                "volumes_per_s", "images_per_s", "step_tflop", "tflops", "mfu", "goal_mfu", "meets_goal",
                "loader_volumes_per_s", "loader_keeps_up", "finite"):
        assert key in s1, key
    assert s1["step_s"] > 0 and 0 < s1["mfu"] and s1["finite"]
    s2 = r["stage2"]
    for key in ("step_s", "pairs_per_s", "step_s_fp32", "step_s_bf16", "chunks", "batch_per_gpu", "finite"):
        assert key in s2, key
    assert s2["step_s"] > 0 and s2["finite"]
    enc = r["encoder"]
    for key in ("ours_fp32_ms", "ours_bf16_ms", "baseline_fp32_ms", "baseline_bf16_ms", "speedup_bf16",
                "speedup_ours_bf16_vs_baseline_fp32", "goal_speedup_bf16", "meets_goal", "cosine_ours_bf16_fp32",
                "baseline", "monai_available"):
        assert key in enc, key
    assert enc["monai_available"] is False and enc["baseline"].startswith("RefViT")
    assert enc["params_ours_m"] > 0 and enc["params_baseline_m"] > 0


def test_stage1_runs_in_a_torchrun_process_group(smoke):
    _, path = smoke
    r = json.loads(path.read_text(encoding="utf-8"))
    pg = r["process_group"]
    assert pg["torchrun"] is True  # TORCHELASTIC_RUN_ID: the child was started by torchrun
    assert pg["initialized"] is True and pg["backend"] == "gloo" and pg["world_size"] == 1
    assert pg["all_reduce_ok"] is True
    assert r["stage1"]["ddp"] is True  # the student ran wrapped in DDP, inside the group
    assert r["trainer_smoke"]["ok"] and r["trainer_smoke"]["backend"] == "gloo"
    assert r["trainer_smoke"]["iterations"] == 2 and r["trainer_smoke"]["encoder_exported"]
    assert r["align_smoke"]["ok"] and r["align_smoke"]["backend"] == "gloo"
    assert r["torchrun_exit"] == 0
    assert r["blocked_modules_loaded"] == []


def test_refvit_computes_what_monai_vit_computes():
    pytest.importorskip("monai")
    from monai.networks.nets import ViT

    gb = _load_script()
    kw = dict(in_channels=1, img_size=(32, 32, 16), patch_size=(8, 8, 8), hidden_size=64, mlp_dim=256,
              num_layers=2, num_heads=4)
    torch.manual_seed(0)
    monai_vit = ViT(classification=False, **kw).eval()
    ref = gb.RefViT(**kw).eval()
    ref.load_state_dict(monai_vit.state_dict(), strict=True)  # same names and shapes
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        a, ha = monai_vit(x)
        b, hb = ref(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hb[-1], ha[-1], rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in monai_vit.parameters())


def test_synthetic_cache_is_a_prepared_cache(tmp_path):
    from decipher_mr.data.cache import PreparedCache

    gb = _load_script()
    cache = PreparedCache(gb.build_synthetic_cache(tmp_path / "c", 3, (40, 40, 12), (1.0, 1.0, 4.0)))
    assert len(cache) == 3 and cache.indices(split="train") == [0, 1, 2]
    vol = cache.load(0)
    import numpy as np

    assert vol.shape == (40, 40, 12) and vol.dtype == "float32" and np.isfinite(vol).all()
    assert float(vol.std()) > 0.5 and float(vol.max()) > 1.0  # z-scored inside the head, background below
    assert all(it.report and "FINDINGS" in it.report for it in cache.items)
