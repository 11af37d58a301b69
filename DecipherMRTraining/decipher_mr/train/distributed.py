"""One entry point for plain ``python`` and ``torchrun``: the same command scales out without changes.

``init_distributed()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); under torchrun a process group is made even for one process (so a
one-GPU run goes through NCCL and DDP), and under plain ``python`` none is.
The backend is NCCL when the device is CUDA and gloo otherwise, so DDP also works on CPU.

Collectives: NCCL only moves CUDA tensors, so every tensor handed to a collective must live on the
training device (``ctx.device``), never on the CPU where ``torch.tensor([...])`` puts it by default.
``init_distributed`` records that device; the helpers here refuse a tensor elsewhere with a message
naming both devices (gloo would accept it, NCCL would crash). A step's scalars go to the host
through :func:`decipher_mr.train.runtime.fetch_metrics`: one tensor on the device, one all-reduce,
one copy.

:class:`ResumableDistributedSampler` is the data order for every stage: a seeded per-epoch
permutation, sharded across ranks, whose position ``(epoch, index)`` goes into the checkpoint so
that a resumed run continues the data stream exactly where it stopped.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process sits in the run.

    >>> ctx = init_distributed()          # world size 1 under plain python
    >>> ctx.is_main, ctx.world_size
    (True, 1)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists: several processes, or one process started by torchrun (so that a
        one-GPU ``torchrun --nproc_per_node=1`` run goes through NCCL and DDP as a multi-GPU run does)."""
        return self.backend is not None


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Initialise from torchrun's environment variables (or return a single-process context).

    Under torchrun a process group is made even for one process, so the one-GPU run exercises the same
    collectives (NCCL) and DDP wrapping as the many-GPU run.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``None`` (CUDA if available). Under torchrun each rank
    uses ``cuda:LOCAL_RANK``.

    >>> ctx = init_distributed("cpu")
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    global _TRAINING_DEVICE
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    _TRAINING_DEVICE = dev
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # plain python: no process group
        return DistributedContext(0, 1, 0, dev, None)
    backend = "nccl" if want_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank, world_size, local_rank, dev, backend)


def shutdown_distributed() -> None:
    """Destroy the process group if one was made (safe to call always)."""
    global _TRAINING_DEVICE
    _TRAINING_DEVICE = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(train, cfg: dict[str, Any]) -> Any:
    """Check a cache-based run config, then ``train(cfg, ctx)`` inside an initialised process group.

    >>> return run_distributed(_train, cfg)      # a training entry point that reads ``cfg["cache"]``
    """
    if not cfg.get("cache") or not cfg.get("output"):
        raise ValueError("the config needs 'cache' (a prepared cache folder) and 'output' (a run folder)")
    ctx = init_distributed(cfg.get("device"))
    try:
        return train(cfg, ctx)
    finally:
        shutdown_distributed()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# The device the last ``init_distributed`` chose: where every collective's tensor must be.
_TRAINING_DEVICE: torch.device | None = None


def _collective_ready(tensor: torch.Tensor, what: str) -> bool:
    """True when a process group exists (the collective must run); raises if ``tensor`` is not on
    the training device (NCCL has no CPU tensors: the run would crash inside the collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if _TRAINING_DEVICE is not None and tensor.device != _TRAINING_DEVICE:
        raise ValueError(
            f"{what}: the tensor is on {tensor.device} but training runs on {_TRAINING_DEVICE}; "
            "collectives need it on the training device (create it with device=ctx.device)"
        )
    return True


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (no-op on one process); returns it.

    >>> center = all_reduce_mean(batch_center)
    """
    if _collective_ready(tensor, "all_reduce_mean"):
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op on one process); returns it."""
    if _collective_ready(tensor, "all_reduce_sum"):
        dist.all_reduce(tensor)
    return tensor




def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (JSON-like values; pickled only between our own processes)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 with gradients flowing back to each rank.

    >>> all_image_emb = all_gather_with_grad(image_emb)   # (world*B, D) for a CLIP loss
    """
    if not _collective_ready(x, "all_gather_with_grad") or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Infinite, seeded, sharded sample order whose position is saved and restored.

    Each epoch is a permutation of ``range(n)`` seeded by ``(seed, epoch)``, padded to a multiple of
    ``world_size`` and split so that rank ``r`` takes every ``world_size``-th entry. ``state_dict()``
    gives ``{"epoch", "index"}`` = the next sample this rank will yield; it counts what was handed
    out; with DataLoader workers prefetching ahead, store :meth:`position_after` (samples consumed) instead.
    With ``with_keys=True`` it yields ``(item, key)`` pairs, ``key`` being the sample's position in the
    global stream (the same for any world size when n is a multiple of it): a seed for its augmentation.

    >>> sampler = ResumableDistributedSampler(len(dataset), seed=0)
    >>> sampler.load_state_dict({"epoch": 3, "index": 5})
    >>> next(iter(sampler))
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 with_keys: bool = False):
        if n <= 0:
            raise ValueError("the sampler needs at least one item (is the cache empty or the selection too strict?)")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.with_keys = with_keys
        self.epoch = 0
        self.index = 0
        self.per_rank = -(-n // world_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample order for ``epoch``."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            perm = np.arange(self.n)
        total = self.per_rank * self.world_size
        if total > self.n:
            perm = np.concatenate([perm, perm[: total - self.n]])
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        # Iterates from the saved position onwards; the position advances as items are yielded.
        span = self.per_rank * self.world_size
        while True:
            order = self.order(self.epoch)
            while self.index < len(order):
                i = int(order[self.index])
                if self.with_keys:
                    # The sample's place in the global stream: the same whatever the world size.
                    yield i, self.epoch * span + self.index * self.world_size + self.rank
                else:
                    yield i
                self.index += 1
            self.epoch += 1
            self.index = 0

    def __len__(self) -> int:
        return self.per_rank

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": self.n, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])

    def position_after(self, consumed: int) -> dict[str, int]:
        """The position ``consumed`` samples after epoch 0 index 0 (what a checkpoint should store
        when DataLoader workers prefetch ahead of the training loop)."""
        epoch, index = divmod(consumed, self.per_rank)
        return {"epoch": epoch, "index": index, "seed": self.seed, "n": self.n, "world_size": self.world_size}
