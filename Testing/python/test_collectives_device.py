"""Every collective of every trainer gets a tensor on the training device (issue 13, defect 1).

NCCL has no CPU tensors: stage 1 under torchrun on GPUs crashed at its first step because the
trainer all-reduced ``torch.tensor([...])`` (made on the CPU) while the model ran on ``cuda:N``.
On a CPU-only machine every tensor reports ``device == cpu``, so comparing devices cannot catch
that; these tests therefore check two things that do fail on the old code:

* **Runtime, with a simulated default device** (``test_<trainer>_collectives_get_training_device_tensors``):
  each trainer runs for real (a few iterations, single process, inside a one-rank gloo process
  group so that every collective is actually issued) under a ``TorchFunctionMode`` that tracks
  which tensors would sit on the *default* device (the CPU) if the training device were another
  one: a tensor made by a factory (``torch.tensor``, ``zeros``, ``arange``, ``from_numpy``, ...)
  without ``device=``, or by ``.cpu()``, is on the default device; ``.to(<device>)`` moves it to the
  training device; any other op's result is on the default device only when all its tensor
  inputs are (an in-place op keeps its tensor's device). ``torch.distributed``'s collectives are
  wrapped to record every tensor they receive; the test fails if one would have been on the default
  device, or is not on ``ctx.device``. The old ``reported``/``flag`` tensors of the stage-1 trainer
  fail it. Limitation: an explicit ``device="cpu"`` is indistinguishable from ``device=ctx.device``
  here (both are the CPU), so the static test below also refuses a literal ``"cpu"``.
* **Static** (``test_no_collective_gets_a_tensor_made_without_a_device``): in every module of
  ``decipher_mr``, a tensor passed to a collective (``all_reduce_*``, ``dist.*``) that is made in the
  same function by a factory call must name a device that is not the literal CPU. This covers code
  paths the short runs do not reach (and the heads trainer, which has no collectives).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import decipher_mr

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(decipher_mr.__file__).parent

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")
HELPERS = ("all_reduce_mean", "all_reduce_sum", "all_gather_with_grad")
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn",
             "randint", "from_numpy", "scalar_tensor", "eye")
_ON_DEFAULT = "_on_default_device"


def _on_default(t: torch.Tensor) -> bool:
    return bool(getattr(t, _ON_DEFAULT, False))


def _mark(out, on_default: bool) -> None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _ON_DEFAULT, on_default)
            except (AttributeError, RuntimeError):
                pass


class DefaultDeviceTracker(TorchFunctionMode):
    """Marks the tensors that would live on the default device (CPU) if training ran elsewhere."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in ("to", "cuda"):
            explicit = name == "cuda" or "device" in kwargs or any(
                isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])
            _mark(out, False if explicit else _on_default(args[0]))
        elif name == "cpu":
            _mark(out, True)
        elif not inputs:
            if isinstance(out, torch.Tensor):  # a factory: default device unless told otherwise
                _mark(out, kwargs.get("device") is None)
        elif isinstance(out, torch.Tensor) and out is inputs[0]:
            pass  # in place: the tensor stays where it is
        else:
            _mark(out, all(_on_default(t) for t in inputs))
        return out


@pytest.fixture
def recorded_collectives(monkeypatch):
    """Run the body in a one-rank gloo group under the tracker; yields the list of recorded calls
    ``(collective, device, on_default_device)``."""
    from decipher_mr.train import distributed as dmr_dist

    calls: list[tuple[str, str, bool]] = []

    def wrap(name, original):
        def recorder(*args, **kwargs):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    calls.append((name, str(t.device), _on_default(t)))
            return original(*args, **kwargs)
        return recorder

    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, wrap(name, getattr(dist, name)))
    original_from_numpy = torch.from_numpy

    def from_numpy(a):  # not dispatched through torch-function modes
        t = original_from_numpy(a)
        _mark(t, True)
        return t

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with DefaultDeviceTracker():
            yield calls
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        dmr_dist._TRAINING_DEVICE = None


def _assert_on_training_device(calls, device="cpu"):
    assert calls, "the run issued no collective: the test would prove nothing"
    bad = [c for c in calls if c[2] or c[1] != device]
    assert not bad, f"collectives got tensors that are not on the training device: {sorted(set(bad))}"


def test_tracker_catches_a_tensor_made_without_a_device():
    with DefaultDeviceTracker():
        w = torch.nn.Linear(2, 2).to(torch.device("cpu")).weight
        loss = (w * 2).sum()
        assert not _on_default(loss)
        assert _on_default(torch.tensor([float(loss.detach())]))
        assert _on_default(torch.tensor([1.0]) / 2)
        assert not _on_default(torch.tensor([1.0], device=loss.device))
        assert not _on_default(torch.tensor([1.0]).to(loss.device))
        assert _on_default(loss.detach().cpu())
        assert not _on_default(loss.detach().clone() + torch.tensor(1.0))  # mixed: where the device tensor is


def test_stage1_collectives_get_training_device_tensors(recorded_collectives, prepared_demo_cache, tmp_path):
    from test_pretrain_vision import tiny_config

    from decipher_mr.train.ssl.trainer import train

    cfg = tiny_config(prepared_demo_cache, tmp_path / "run", "train.iterations=2", "train.checkpoint_every=100",
                      "device=cpu", "train.export_teacher=false", "loss.centering=sinkhorn")
    summary = train(cfg)
    assert len(summary["losses"]) == 2
    _assert_on_training_device(recorded_collectives)
    # the per-iteration reports and the stop flag are among them (not only the loss centres)
    assert sum(1 for c in recorded_collectives if c[0] == "all_reduce") >= 2 * 3


def test_align_collectives_get_training_device_tensors(recorded_collectives, tmp_path):
    from brain_pairs import build_brain_pairs

    from decipher_mr.train.align import ALIGN_DEFAULTS, train_align
    from decipher_mr.train.run_config import load_run_config

    pairs = build_brain_pairs(tmp_path / "pairs", n_train=8, n_val=2, n_test=2)
    view = {"size": [32, 40, 32], "mode": "resize", "augment": True}
    cfg = load_run_config(REPO / "DecipherMRTraining/configs/align-demo.json", ALIGN_DEFAULTS, [
        f"cache={pairs}", f"output={tmp_path / 'align'}", "iterations=2", "checkpoint_every=100", "progress=false",
        'text_trainable="frozen"', "batch_size=4", "chunks=2", f"image={json.dumps(view)}", 'vision={"preset": "vit-micro"}',
        "device=cpu"])
    train_align(cfg)
    _assert_on_training_device(recorded_collectives)


def test_mlm_collectives_get_training_device_tensors(recorded_collectives, tmp_path):
    from brain_pairs import build_brain_pairs

    from decipher_mr.train.mlm import MLM_DEFAULTS, train_mlm
    from decipher_mr.train.run_config import load_run_config

    pairs = build_brain_pairs(tmp_path / "pairs", n_train=8, n_val=2, n_test=2)
    cfg = load_run_config(REPO / "DecipherMRTraining/configs/text-tiny.json", MLM_DEFAULTS, [
        f"cache={pairs}", f"output={tmp_path / 'mlm'}", "iterations=2", "checkpoint_every=100", "progress=false",
        "batch_size=4", "device=cpu"])
    train_mlm(cfg)
    _assert_on_training_device(recorded_collectives)


# ---------------------------------------------------------------------------------------------
# static


def _collective_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Name) and f.id in HELPERS:
        return f.id
    if isinstance(f, ast.Attribute) and (f.attr in HELPERS or f.attr in COLLECTIVES):
        base = ast.unparse(f.value)
        if f.attr in HELPERS or base in ("dist", "torch.distributed"):
            return f.attr
    return None


def _bad_factory(node: ast.AST) -> str | None:
    """Why ``node`` (an expression) makes a tensor off the training device, if it visibly does."""
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        f = call.func
        if isinstance(f, ast.Attribute) and ast.unparse(f.value) == "torch" and f.attr in FACTORIES:
            device = next((k.value for k in call.keywords if k.arg == "device"), None)
            if device is None or (isinstance(device, ast.Constant) and device.value is None):
                return f"torch.{f.attr}(...) without device="
            if isinstance(device, ast.Constant) and str(device.value).startswith("cpu"):
                return f"torch.{f.attr}(..., device='cpu')"
        if isinstance(f, ast.Attribute) and f.attr == "cpu" and not call.args:
            return ".cpu()"
    return None


def collective_offences(source: str, filename: str = "<src>") -> list[str]:
    """Collective calls whose tensor argument is made, in the same function, off the training device."""
    tree = ast.parse(source, filename)
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            assigned.setdefault(name.id, []).append(node.value)
        for call in ast.walk(fn):
            if not isinstance(call, ast.Call) or _collective_name(call) is None:
                continue
            for arg in call.args[:1]:
                exprs = [arg] + (assigned.get(arg.id, []) if isinstance(arg, ast.Name) else [])
                for e in exprs:
                    why = _bad_factory(e)
                    if why:
                        found.append(f"{filename}:{call.lineno} {_collective_name(call)}({ast.unparse(arg)}): {why}")
    return found


def test_static_check_flags_the_old_stage1_pattern():
    old = (
        "def step(loss, stop):\n"
        "    reported = torch.tensor([float(loss.detach()), 1.0])\n"
        "    all_reduce_mean(reported)\n"
        "    flag = torch.tensor([1.0 if stop else 0.0])\n"
        "    all_reduce_sum(flag)\n"
        "    ok = torch.zeros(2, device=loss.device)\n"
        "    dist.all_reduce(ok)\n"
        "    dist.broadcast(torch.ones(1, device='cpu'), src=0)\n"
    )
    offences = collective_offences(old)
    assert len(offences) == 3, offences
    assert any("all_reduce_mean(reported)" in o for o in offences)
    assert any("all_reduce_sum(flag)" in o for o in offences)


def test_no_collective_gets_a_tensor_made_without_a_device():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        offences += collective_offences(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not offences, "\n".join(offences)
