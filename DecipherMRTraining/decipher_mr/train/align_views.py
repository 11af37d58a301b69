"""Stage-2 image views (:mod:`decipher_mr.data.views`: the view the served embedding uses), their intensity jitter,
and the per-iteration batches that DataLoader workers build for :func:`decipher_mr.train.align.train_align`.

>>> images = image_batch(cache, [0, 1], {"size": [64, 64, 64], "mode": "fit"}, rng=None)
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np
import torch

from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.sampling import RegionBatchSampler
from decipher_mr.data.views import fit_volume, image_view  # noqa: F401 (fit_volume re-exported)


def augment_intensity(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light intensity jitter (scale ±10 %, shift ±0.1, noise σ 0.02). No flips: left/right is in the reports.

    Everything is float32 (the noise is drawn in float32, no float64 temporaries): half the memory
    traffic of drawing float64 noise and casting afterwards.
    """
    out = np.asarray(volume, dtype=np.float32) * np.float32(rng.uniform(0.9, 1.1))
    out += np.float32(rng.uniform(-0.1, 0.1))
    noise = rng.standard_normal(size=out.shape, dtype=np.float32)
    noise *= np.float32(0.02)
    out += noise
    return out


def image_batch(cache: PreparedCache, indices: Sequence[int], image_cfg: dict[str, Any],
                rng: np.random.Generator | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, X, Y, Z) views of cache items (float32, or ``dtype``); ``rng=None`` gives the
    deterministic eval view."""
    size = tuple(int(s) for s in image_cfg["size"])
    out = torch.empty((len(indices), 1, *size), dtype=dtype)
    for n, i in enumerate(indices):
        try:
            arr = cache.load(i)
        except Exception as exc:  # a damaged item should name itself, not crash anonymously
            raise RuntimeError(f"{cache.root / cache.items[i].array}: cannot read item {cache.items[i].id} ({exc})") from exc
        # the same view the served embedding uses (Session.image_embedding), randomised by ``rng``
        v = image_view(arr, cache.items[i].spacing, image_cfg, rng)
        if rng is not None and image_cfg.get("augment", True):
            v = augment_intensity(v, rng)
        out[n, 0] = torch.from_numpy(v)  # cast to ``dtype`` while copying
    return out


class AlignBatches(torch.utils.data.Dataset):
    """Stage-2 training batches by iteration number, for a ``DataLoader`` with workers.

    Item ``it`` is ``(positions, images)``: this rank's share of global batch ``it`` of the
    :class:`RegionBatchSampler` (positions into the sampler's item list) and their augmented views
    in ``transfer_dtype`` (float16 by default: half the shared memory and host-to-device traffic of
    float32; intensities are z-scored, so fp16's 11-bit mantissa keeps ~3 significant digits). The
    augmentation is seeded by ``(seed, it, rank)`` alone, so the batches are the same for any number
    of workers, and a loader over ``range(start, iterations)`` resumes the exact data stream.

    >>> loader = DataLoader(AlignBatches(cache, train_idx, sampler, image_cfg, seed, rank),
    ...                     sampler=range(start, iterations), batch_size=None, num_workers=4)
    """

    def __init__(self, cache: PreparedCache, items: Sequence[int], sampler: RegionBatchSampler,
                 image_cfg: dict[str, Any], seed: int, rank: int = 0, transfer_dtype: torch.dtype = torch.float16):
        self.cache, self.items, self.sampler, self.image_cfg = cache, list(items), sampler, image_cfg
        self.seed, self.rank, self.transfer_dtype = int(seed), int(rank), transfer_dtype
        self._epoch: tuple[int, list[list[int]]] | None = None

    def positions(self, iteration: int) -> list[int]:
        """This rank's sampler positions for ``iteration`` (what ``sampler.stream(0)`` yields there)."""
        epoch, b = self.sampler.position(iteration)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, list(self.sampler.epoch_batches(epoch)))
        return self._epoch[1][b]

    def __len__(self) -> int:  # iterations are unbounded; the loader's sampler says which are read
        return sys.maxsize

    def __getitem__(self, iteration: int) -> tuple[list[int], torch.Tensor]:
        local = self.positions(int(iteration))
        rng = np.random.default_rng([self.seed, int(iteration), self.rank])
        images = image_batch(self.cache, [self.items[i] for i in local], self.image_cfg, rng, dtype=self.transfer_dtype)
        return local, images
