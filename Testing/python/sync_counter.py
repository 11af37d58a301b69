"""Counting host synchronisations on a CPU-only machine (shared by the trainers' tests): see
:class:`SyncCounter`."""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


SYNC_METHODS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "nonzero",
                "masked_select", "unique", "equal", "allclose", "is_nonzero", "argwhere", "__format__", "__repr__"}
_MARK = "_simulated_on_device"


class SyncCounter(TorchFunctionMode):
    """Counts the calls that would make the host wait for the GPU, on a CPU-only machine.

    A CPU has no device to wait for, so the counter simulates one: a tensor is "on the device" when
    it was moved there with ``.to(<torch.device or tensor>)`` (what the trainers do with
    ``ctx.device``; a module's ``.to(ctx.device)`` marks its parameters), made by a factory with a
    ``device=`` argument, or computed by an op with any input on the device (in-place ops keep their
    tensor's mark). Tensors made otherwise (numpy, tokenizer output, CPU masking, the optimiser's
    step counters) are host tensors. A sync is a call, on a device tensor, of a method that returns
    host data (``item``, ``tolist``, ``float()``, ``bool()``, ``numpy``, ...), of an op with a
    data-dependent output shape (``nonzero``, boolean indexing), or a blocking copy to the host
    (``.cpu()``, ``.to("cpu")`` without ``non_blocking=True``, ``host.copy_(device)``).
    Limitation: ``.to("cpu")`` and ``.to(ctx.device)`` are told apart by the argument being the
    literal string ``"cpu"``, which is how the trainers write a host copy.
    """

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.library_syncs: list[str] = []  # made inside Hugging Face transformers, not by our code

    def _sync(self, name: str) -> None:
        inside_hf = any("/transformers/" in f.filename for f in traceback.extract_stack())
        (self.library_syncs if inside_hf else self.syncs).append(name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(getattr(t, _MARK, False) for t in tensors)
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = func(*args, **kwargs)
        if name in ("to", "cuda", "cpu") and this is not None:
            target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device, torch.Tensor))]
            to_host = name == "cpu" or any(isinstance(a, str) and a == "cpu" for a in target)
            if to_host:
                if getattr(this, _MARK, False) and not kwargs.get("non_blocking", False):
                    self._sync(name)
                self._mark(out, False)
            elif any(isinstance(a, torch.device) or (isinstance(a, torch.Tensor) and getattr(a, _MARK, False))
                     for a in target) or name == "cuda":
                self._mark(out, True)
            else:
                self._mark(out, getattr(this, _MARK, False))
            return out
        if on_device and (name in SYNC_METHODS or (name == "__getitem__" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:])))):
            self._sync(name)
        if name == "copy_" and this is not None and not getattr(this, _MARK, False) and on_device:
            self._sync("copy_ to host")
            return out
        if name.endswith("_") and not name.endswith("__") and this is not None:
            return out  # in place: keeps its tensor's mark
        device = kwargs.get("device")
        self._mark(out, on_device or (device is not None and device != "cpu"), tensors)
        return out

    @staticmethod
    def _mark(out, value: bool, inputs=()) -> None:
        passed_through = {id(t) for t in inputs}  # e.g. grouping helpers: a tensor keeps its own mark
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in passed_through:
                try:
                    setattr(t, _MARK, value)
                except (AttributeError, RuntimeError):
                    pass


def syncs_per_step(run, cfg, monkeypatch) -> list[int]:
    from decipher_mr.train.monitor import TrainingMonitor

    counter = SyncCounter()
    at_step: list[int] = []
    real_step = TrainingMonitor.step

    def step(self, *a, **k):
        at_step.append(len(counter.syncs))
        return real_step(self, *a, **k)

    monkeypatch.setattr(TrainingMonitor, "step", step)
    with counter:
        run(cfg)
    # syncs between one monitor.step and the next: a whole iteration (the first window includes setup)
    print("syncs inside transformers:", len(counter.library_syncs), sorted(set(counter.library_syncs)))
    return [b - a for a, b in zip(at_step, at_step[1:])]
