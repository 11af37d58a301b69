"""Organ-aware batches for contrastive alignment, with a share of mixed-region batches.

A CLIP batch that mixes a knee with a brain is solved by the body region alone; a batch of brains
forces the model to tell lesions, sides and sequences apart. But a model that only ever sees
one-region batches never has to tell a brain from a knee: the region is then missing from the shared
space (measured on the demo: zero-shot body region at chance, every volume finding the same knee
reports). :class:`RegionBatchSampler` therefore builds each *global* batch from one region (or one
configured group of regions), except for a ``mixed_fraction`` of each epoch's items, which go into
batches drawn across all regions. Every rank gets its contiguous share of the same global batch, so
the gathered loss sees exactly that batch.

The order is a pure function of ``(seed, epoch)``: every rank computes the same list without
talking to the others, and a resumed run restarts at the saved batch, not at the epoch's start.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class RegionBatchSampler:
    """Yield this rank's list of dataset indices for each region-homogeneous global batch.

    ``regions[i]`` is the body region of dataset item ``i`` (``None`` counts as ``"unknown"``).
    ``batch_size`` is the global batch (all ranks together); it must be a multiple of ``world_size``.
    ``groups`` merges regions into one batching group, e.g. ``[["spine", "abdomen"]]``.
    The last, short batch of a region is kept (every item is seen once per epoch) and padded with
    items of the same region up to a multiple of ``world_size`` and at least ``min_batch`` items,
    so all ranks gather equal shapes and no batch has a single pair (a loss of zero). Regions with
    fewer than ``min_batch`` items share one ``"mixed"`` group. ``mixed_fraction`` (0 to 1) of every
    region's items (the same count each epoch, different items) go into batches across all regions:
    0 is purely organ-aware, 1 purely random.

    >>> sampler = RegionBatchSampler(["brain", "knee", "brain"], batch_size=2, seed=0)
    >>> for batch in sampler.epoch_batches(0): ...
    """

    def __init__(
        self,
        regions: Sequence[str | None],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[Sequence[str]] | None = None,
        min_batch: int = 2,
        shuffle: bool = True,
        mixed_fraction: float = 0.0,
    ):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not a multiple of the world size {world_size}")
        if not regions:
            raise ValueError("the sampler needs at least one item (is the selection empty?)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.min_batch, self.shuffle = max(min_batch, world_size), shuffle
        if not 0.0 <= float(mixed_fraction) <= 1.0:
            raise ValueError(f"mixed_fraction must be between 0 and 1, not {mixed_fraction}")
        self.mixed_fraction = float(mixed_fraction)
        group_of = {r: "+".join(sorted(g)) for g in (groups or []) for r in g}
        self.members: dict[str, np.ndarray] = {}
        names = [group_of.get(r or "unknown", r or "unknown") for r in regions]
        # a region too small for one batch of its own joins a shared "mixed" group rather than
        # being paired with copies of itself
        counts = {n: names.count(n) for n in set(names)}
        names = [n if counts[n] >= self.min_batch else "mixed" for n in names]
        for name in sorted(set(names)):
            self.members[name] = np.array([i for i, n in enumerate(names) if n == name], dtype=np.int64)

    def _region_batches(self, idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        perm = rng.permutation(idx) if self.shuffle else idx.copy()
        batches = [perm[s : s + self.batch_size] for s in range(0, len(perm), self.batch_size)]
        last = batches[-1]
        want = max(self.min_batch, -(-len(last) // self.world_size) * self.world_size)
        if len(last) < want:
            # pad with the region's other items (already seen in this epoch); a region smaller than
            # the padded batch has to repeat, which only ever happens for tiny regions
            used = set(last.tolist())
            others = np.array([i for i in perm if int(i) not in used], dtype=np.int64)
            filler = np.resize(others if len(others) else perm, want - len(last))
            batches[-1] = np.concatenate([last, filler])
        return batches

    def _mixed_count(self, n: int) -> int:
        """How many of a region's ``n`` items go to mixed batches each epoch."""
        return int(round(self.mixed_fraction * n))

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of ``epoch`` in order (identical on all ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        pool: list[np.ndarray] = []
        for name in sorted(self.members):
            idx = self.members[name]
            m = self._mixed_count(len(idx))
            if m:
                perm = rng.permutation(idx) if self.shuffle else idx
                pool.append(perm[:m])
                idx = np.sort(perm[m:])
            if len(idx):
                batches += self._region_batches(idx, rng)
        if pool:
            batches += self._region_batches(np.concatenate(pool), rng)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[n] for n in order]
        return batches

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's share of each global batch of ``epoch``, from batch number ``start`` on."""
        for batch in self.global_batches(epoch)[start:]:
            share = len(batch) // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()

    def batches_per_epoch(self) -> int:
        mixed = [self._mixed_count(len(m)) for m in self.members.values()]
        own = sum(-(-(len(m) - k) // self.batch_size) for m, k in zip(self.members.values(), mixed))
        return own + -(-sum(mixed) // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def position(self, iteration: int) -> tuple[int, int]:
        """``(epoch, batch within epoch)`` of a global iteration count (for resume)."""
        return divmod(iteration, self.batches_per_epoch())

    def stream(self, iteration: int = 0) -> Iterator[list[int]]:
        """Endless batches starting at global ``iteration`` (crossing epochs deterministically).

        >>> for it, batch in zip(range(start, total), sampler.stream(start)): ...
        """
        epoch, start = self.position(iteration)
        while True:
            yield from self.epoch_batches(epoch, start)
            epoch, start = epoch + 1, 0
