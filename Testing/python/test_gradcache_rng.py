"""GradCache RNG replay (issue 13, item 2): with dropout on in both towers, the cached two-pass step
gives the gradients of one ordinary forward/backward that draws the same masks; and the replay covers
the generator of every accelerator device a chunk touches, not only the CPU one.

This machine has no accelerator, so the device part is tested with stand-in device modules put in
place of ``torch.<type>`` (the lookup ``rng_state._rng_module``) and with FakeTensor tensors that claim
``cuda``/``xpu`` devices; a real CUDA generator is not exercised here.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from decipher_mr.models.clip import ImageTextModel
from decipher_mr.models.text import TextTower
from decipher_mr.models.vit3d import build_vision_encoder
from decipher_mr.train import align, rng_state
from decipher_mr.train.align import RngState, TextSide, clip_step, replay_rng, rng_devices
from decipher_mr.train.clip_loss import ClipLoss

REPORTS = [
    "Axial T2 brain. No acute infarct.",
    "Sagittal knee. Medial meniscus tear with joint effusion and bone bruise.",
    "Lumbar spine. Mild disc bulge at L4-5.",
    "Brain. Small vessel ischemic change in the periventricular white matter.",
    "Abdomen. Simple hepatic cyst.",
    "Brain. Normal study.",
]


def noisy_model() -> ImageTextModel:
    """The tiny model in train mode with a lot of randomness in both towers: stochastic depth in the
    image tower (its only random layer) and every dropout of the text tower at 0.3."""
    torch.manual_seed(0)
    model = ImageTextModel(build_vision_encoder("vit-micro", drop_path_rate=0.5), TextTower.from_spec({"tiny": True}))
    for module in model.text.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    return model.train()


def images() -> torch.Tensor:
    return torch.randn(len(REPORTS), 1, 32, 40, 32, generator=torch.Generator().manual_seed(1))


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_step(chunks: int, seed: int):
    """One ordinary forward over the whole batch, computed chunk by chunk in GradCache's order
    (images of a chunk, then its reports) so it draws exactly the masks of GradCache's first pass,
    then one backward of the full-batch loss. No caching, no replay."""
    model = noisy_model()
    text = TextSide(model, REPORTS, torch.device("cpu"), precompute=False)
    idx = list(range(len(REPORTS)))
    x = images()
    torch.manual_seed(seed)
    img, txt = [], []
    for part in np.array_split(np.arange(len(idx)), chunks):
        img.append(model.encode_image(x[part]))
        txt.append(text.embed([idx[i] for i in part]))
    img, txt = torch.cat(img), torch.cat(txt)
    loss = ClipLoss()(img, txt, model.scale())
    loss.backward()
    return loss.detach(), img.detach(), txt.detach(), grads_of(model), torch.get_rng_state()


def gradcache_step(chunks: int, seed: int):
    model = noisy_model()
    text = TextSide(model, REPORTS, torch.device("cpu"), precompute=False)
    torch.manual_seed(seed)
    loss, img, txt = clip_step(model, ClipLoss(), images(), text, list(range(len(REPORTS))), chunks=chunks)
    return loss, img, txt, grads_of(model), torch.get_rng_state()


def max_grad_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)


def test_dropout_is_really_on_in_both_towers():
    """Precondition of the equivalence test: the two towers' outputs depend on the RNG draws."""
    model = noisy_model()
    text = TextSide(model, REPORTS, torch.device("cpu"), precompute=False)
    with torch.no_grad():
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append((model.encode_image(images()), text.embed(range(len(REPORTS)))))
    assert not torch.allclose(outs[0][0], outs[1][0], atol=1e-4)
    assert not torch.allclose(outs[0][1], outs[1][1], atol=1e-4)


@pytest.mark.parametrize("chunks", [2, 3])
def test_gradcache_in_train_mode_equals_one_backward_with_the_same_draws(chunks, monkeypatch):
    loss_r, img_r, txt_r, grads_r, rng_r = reference_step(chunks, seed=7)
    loss_g, img_g, txt_g, grads_g, rng_g = gradcache_step(chunks, seed=7)
    torch.testing.assert_close(img_g, img_r)
    torch.testing.assert_close(txt_g, txt_r)
    torch.testing.assert_close(loss_g, loss_r)
    assert grads_g.keys() == grads_r.keys() and len(grads_r) > 10
    for name in grads_r:
        torch.testing.assert_close(grads_g[name], grads_r[name], atol=1e-5, rtol=1e-3, msg=name)
    # the global stream goes on as if the batch had been encoded once (the second pass is a fork)
    assert torch.equal(rng_g, rng_r)

    # control: the comparison sees the masks. Without the replay the second pass draws new masks and
    # the gradients are far off (relative gaps of order 1, against ~1e-6 above).
    assert max_grad_gap(grads_g, grads_r) < 1e-3
    monkeypatch.setattr(align, "replay_rng", lambda state: contextlib.nullcontext())
    _, _, _, grads_bad, _ = gradcache_step(chunks, seed=7)
    assert max_grad_gap(grads_bad, grads_r) > 0.05


def test_rng_devices_lists_each_accelerator_device_of_tensors_parameters_and_devices(monkeypatch):
    """Every non-CPU device of the inputs, whatever its type, once each, in first-seen order; FakeTensor
    gives tensors and parameters on cuda/xpu devices without the hardware."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Current:  # an index-less "cuda" means the current cuda device
        @staticmethod
        def current_device() -> int:
            return 1

        get_rng_state = set_rng_state = None

    monkeypatch.setattr(rng_state, "_rng_module", lambda t: Current if t == "cuda" else None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda1 = torch.empty(2, device="cuda:1")
        on_cuda0 = torch.empty(2, device="cuda:0")
        tower = torch.nn.Module()
        tower.weight = torch.nn.Parameter(torch.empty(2, 2, device="xpu:0"))
        tower.register_buffer("table", torch.empty(3, device="cuda:0"))
        devices = rng_devices(on_cuda1, torch.empty(2), "cuda", tower, [on_cuda0, (torch.device("cpu"), None)],
                              torch.device("meta"))
    assert devices == [torch.device("cuda", 1), torch.device("xpu", 0), torch.device("cuda", 0), torch.device("meta")]
    assert rng_devices(torch.empty(2), torch.nn.Linear(2, 2), "cpu", None) == []


class FakeGenerators:
    """A stand-in for ``torch.cuda``/``torch.xpu``: one integer-tensor state per device, and a log of
    the get/set calls made through the device-generic API ``get_rng_state(device)`` /
    ``set_rng_state(state, device)``."""

    def __init__(self, kind: str, log: list):
        self.kind, self.log, self.states = kind, log, {}

    def get_rng_state(self, device):
        self.log.append(("get", torch.device(device)))
        return self.states.setdefault(torch.device(device), torch.tensor([0])).clone()

    def set_rng_state(self, state, device):
        self.log.append(("set", torch.device(device), int(state)))
        self.states[torch.device(device)] = state.clone()

    def draw(self, device) -> None:  # what a dropout layer on that device does to its generator
        self.states[torch.device(device)] = self.states.setdefault(torch.device(device), torch.tensor([0])) + 1


def test_rng_state_saves_and_restores_every_device_through_the_generic_api(monkeypatch):
    log: list = []
    modules = {"cuda": FakeGenerators("cuda", log), "xpu": FakeGenerators("xpu", log)}
    monkeypatch.setattr(rng_state, "_rng_module", lambda t: modules.get(t))
    cuda0, cuda1, xpu0 = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("xpu", 0)
    for d in (cuda0, cuda1, xpu0):
        modules[d.type].states[d] = torch.tensor([10 * (d.index + 1) + len(d.type)])

    torch.manual_seed(3)
    saved = RngState([cuda0, cuda1, xpu0, torch.device("meta")])  # meta: no generator, skipped
    assert log == [("get", cuda0), ("get", cuda1), ("get", xpu0)]
    cpu_draw = torch.rand(4)
    for d in (cuda0, cuda1, xpu0):  # the first pass uses every generator
        modules[d.type].draw(d)
    moved = {d: int(modules[d.type].states[d]) for d in (cuda0, cuda1, xpu0)}

    log.clear()
    with replay_rng(saved):
        # inside: every generator is back where it was when the state was taken
        assert torch.equal(torch.rand(4), cpu_draw)
        assert {d: int(modules[d.type].states[d]) for d in (cuda0, cuda1, xpu0)} == {
            cuda0: 14, cuda1: 24, xpu0: 13}
        for d in (cuda0, cuda1, xpu0):
            modules[d.type].draw(d)
    # after: the streams the block found, untouched by the replay
    assert {d: int(modules[d.type].states[d]) for d in (cuda0, cuda1, xpu0)} == moved
    assert ("set", cuda0, 14) in log and ("set", cuda1, 24) in log and ("set", xpu0, 13) in log
    assert ("set", cuda0, moved[cuda0]) in log and ("set", xpu0, moved[xpu0]) in log
    assert {entry[1] for entry in log} == {cuda0, cuda1, xpu0}


def test_the_real_lookup_is_device_generic():
    """``_rng_module`` resolves a device type to ``torch.<type>`` through ``torch.get_device_module``
    (the same modules fork_rng/checkpoint use), and only where that module has the per-device RNG
    API; types without one (meta, cpu, which is handled separately) give None. The modules exist on a
    CPU-only build even though their devices do not."""
    for kind in ("cuda", "xpu", "mps", "mtia"):
        module = align._rng_module(kind)
        assert module is torch.get_device_module(kind)
        assert callable(module.get_rng_state) and callable(module.set_rng_state)
    assert align._rng_module("meta") is None and align._rng_module("cpu") is None


def test_clip_step_replays_the_generator_of_the_devices_it_runs_on(monkeypatch):
    """End to end through GradCache with a stand-in "cuda:0" generator that the towers' forwards draw
    from (as CUDA dropout would): each chunk's re-forward starts from the state its first forward
    saw, and the step leaves the generator where the first pass left it."""
    log: list = []
    fake = FakeGenerators("cuda", log)
    monkeypatch.setattr(rng_state, "_rng_module", lambda t: fake if t == "cuda" else None)
    seen_devices: list = []
    real_rng_devices = align.rng_devices

    def devices_plus_cuda(*objects):
        seen_devices.append(objects)
        return real_rng_devices(*objects) + [torch.device("cuda", 0)]

    monkeypatch.setattr(align, "rng_devices", devices_plus_cuda)
    model = noisy_model()
    seen: list[int] = []

    def draws(module, args):
        seen.append(int(fake.states.setdefault(torch.device("cuda", 0), torch.tensor([0]))))
        fake.draw("cuda:0")

    model.vision.register_forward_pre_hook(draws)
    model.text.register_forward_pre_hook(draws)
    text = TextSide(model, REPORTS, torch.device("cpu"), precompute=False)
    x = images()
    clip_step(model, ClipLoss(), x, text, list(range(len(REPORTS))), chunks=3)
    assert seen[:6] == [0, 1, 2, 3, 4, 5]  # first pass: image, report of each of 3 chunks
    assert seen[6:] == seen[:6]  # second pass: the same draws
    assert int(fake.states[torch.device("cuda", 0)]) == 6
    # the devices come from the images, the text side and both towers
    (objects,) = seen_devices
    assert any(o is x for o in objects) and any(o is model for o in objects)
