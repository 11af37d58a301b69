"""RNG state of the CPU and of every accelerator a computation touches, saved and replayed.

Stage 2's GradCache re-runs each chunk's forward with gradients; :func:`replay_rng` makes that
re-forward draw the same dropout masks as the first one, on the CPU and on every device involved.

>>> state = RngState(rng_devices(images, model))
>>> with replay_rng(state):
...     out = model(images)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


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
