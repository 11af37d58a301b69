"""Encoding a prepared volume once: sliding windows on the patch grid, and a cache keyed by content.

A volume whose patch grid fits ``max_tokens`` goes through the encoder in one pass. A larger one is
cut into windows on the patch grid (so every window's patches are exactly the whole volume's
patches): each window is encoded with a halo of extra patches around its core, and only the core's
tokens are kept, so every patch token comes from a window in which it had context on every side
that exists. The class token is the core-size-weighted mean of the windows' class tokens.

The cache key is a hash of the voxels and the geometry (not the file name), so the same volume
loaded twice, or passed as a path and then as an array, is encoded once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from decipher_mr.data.preprocess import GeometryRecord
from decipher_mr.data.volume import Volume

# 4096 tokens = the 256x256x24 training crop plus headroom; beyond that attention cost (N^2) and
# memory grow faster than the context helps, so large volumes are windowed.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_HALO = 2  # patches of context on each side of a window's core

ProgressFn = Callable[[str, float], None]


_REMEMBERED: dict[int, tuple] = {}  # id(volume) -> (weak reference, array, geometry, hash) of frozen volumes


def volume_content_hash(volume: Volume) -> str:
    """Hash of a volume's voxels, dtype, shape and geometry (hex); no copy of the voxels is made. A volume
    whose array is frozen (read-only all the way down: a panel's snapshot, a volume a worker received) is
    hashed once; its geometry is compared again every time.

    >>> volume_content_hash(read_volume("t1.nii.gz"))[:12]
    """
    import weakref

    from decipher_mr.data.volume import frozen

    arr = np.ascontiguousarray(volume.array)
    head = (f"{arr.dtype.str}|{arr.shape}|".encode() + np.asarray(volume.spacing, np.float64).round(6).tobytes()
            + np.asarray(volume.origin, np.float64).round(5).tobytes()
            + np.asarray(volume.direction, np.float64).round(6).tobytes())
    held = _REMEMBERED.get(id(volume))
    if held is not None and held[0]() is volume and held[1] is volume.array and held[2] == head:
        return held[3]
    h = hashlib.blake2b(digest_size=20)
    h.update(head)
    h.update(memoryview(arr).cast("B"))
    key = h.hexdigest()
    if frozen(volume.array):
        for stale in [i for i, (ref, *_) in _REMEMBERED.items() if ref() is None]:
            del _REMEMBERED[stale]
        _REMEMBERED[id(volume)] = (weakref.ref(volume), volume.array, head, key)
    return key


def axis_tiles(n: int, window: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Tiles of one axis of length ``n``: ``(core_start, core_stop, win_start, win_stop)``.

    Cores partition ``[0, n)``; a window is its core plus up to ``halo`` on each side, shifted inward
    at the borders, so every window has the full ``window`` length (when ``n`` is at least that).

    >>> axis_tiles(10, 6, 1)
    [(0, 3, 0, 6), (3, 7, 2, 8), (7, 10, 4, 10)]
    """
    if n <= window:
        return [(0, n, 0, n)]
    core = max(1, window - 2 * halo)
    count = math.ceil(n / core)
    bounds = [round(i * n / count) for i in range(count + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # centre a full-length window on the core; at the borders shift it inward
        lo = min(max(a - (window - (b - a)) // 2, 0), n - window)
        out.append((a, b, lo, lo + window))
    return out


def grid_tiles(grid: Sequence[int], window: Sequence[int], halo: int) -> list[tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """3D tiles of a patch grid: ``(core, window, core_in_window)`` slices in patch units."""
    per_axis = [axis_tiles(int(g), int(w), halo) for g, w in zip(grid, window)]
    tiles = []
    for tx in per_axis[0]:
        for ty in per_axis[1]:
            for tz in per_axis[2]:
                core = tuple(slice(t[0], t[1]) for t in (tx, ty, tz))
                win = tuple(slice(t[2], t[3]) for t in (tx, ty, tz))
                inner = tuple(slice(t[0] - t[2], t[1] - t[2]) for t in (tx, ty, tz))
                tiles.append((core, win, inner))
    return tiles


@dataclass
class EncodedVolume:
    """One volume after preprocessing and one encoder pass (all a head or a query needs).

    ``prepared`` is the float32 array on the canonical RAS grid; ``record`` maps that grid back to the
    source; ``cls`` (D,), ``patch_tokens`` (N, D) and ``layers`` {block: (N, D)} are the encoder's
    outputs in token order over ``grid``; ``source`` is the input's geometry (array not kept).

    >>> enc = session.encode("t1.nii.gz"); enc.grid, enc.patch_tokens.shape
    """

    key: str
    prepared: np.ndarray
    record: GeometryRecord
    source: Volume
    cls: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int, int]
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: int = 1
    encode_seconds: float = 0.0

    def output(self, grid_slice: tuple[slice, ...] | None = None):
        """An :class:`~decipher_mr.models.vit3d.EncoderOutput` (batch of one) for the whole grid or a
        sub-grid in patch units, as the heads take it."""
        from decipher_mr.models.vit3d import EncoderOutput

        if grid_slice is None:
            return EncoderOutput(cls=self.cls[None], patch_tokens=self.patch_tokens[None], grid=self.grid,
                                 layers={k: v[None] for k, v in self.layers.items()})
        sub = tuple(s.stop - s.start for s in grid_slice)

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.view(*self.grid, t.shape[-1])[grid_slice].reshape(1, -1, t.shape[-1])

        return EncoderOutput(cls=self.cls[None], patch_tokens=cut(self.patch_tokens), grid=sub,  # type: ignore[arg-type]
                             layers={k: cut(v) for k, v in self.layers.items()})

    @property
    def nbytes(self) -> int:
        tensors = [self.cls, self.patch_tokens, *self.layers.values()]
        return int(self.prepared.nbytes + sum(t.numel() * t.element_size() for t in tensors))


class TokenCache:
    """A small LRU of :class:`EncodedVolume` by content hash, bounded by count and bytes.

    >>> cache = TokenCache(max_items=4); cache.put(enc); cache.get(enc.key) is enc
    True
    """

    def __init__(self, max_items: int = 4, max_bytes: int = 4 << 30):
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        self._items: OrderedDict[str, EncodedVolume] = OrderedDict()

    def get(self, key: str) -> EncodedVolume | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, item: EncodedVolume) -> None:
        self._items[item.key] = item
        self._items.move_to_end(item.key)
        while len(self._items) > max(self.max_items, 1) or (
                len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes):
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _block_progress(encoder, on_block: Callable[[int], None]):
    """Forward pre-hooks that report each block as it starts (and let a cancel interrupt a pass)."""
    handles = []
    for n, block in enumerate(encoder.blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, _a, n=n: on_block(n)))
    return handles


@torch.inference_mode()
def encode_prepared(encoder, prepared: np.ndarray, layers: Sequence[int] = (), device: torch.device | str = "cpu",
                    autocast: Any = None, max_tokens: int = DEFAULT_MAX_TOKENS, halo: int = DEFAULT_HALO,
                    progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], dict[int, torch.Tensor], int]:
    """Encode a prepared array: ``(cls (D,), patch_tokens (N, D), grid, layers, windows)``, float32 on CPU.

    ``autocast`` is a context manager factory (e.g. bf16 autocast) or ``None``. ``progress(stage,
    fraction)`` is called before every transformer block; it may raise to cancel. Beyond
    ``max_tokens`` patches the grid is encoded in cubic windows of about ``max_tokens`` patches.

    >>> cls, tokens, grid, layers, n = encode_prepared(encoder, arr, layers=(1, 2))
    """
    import contextlib

    grid, _ = encoder.grid_for(prepared.shape)
    patch = encoder.config.patch_size
    total = math.prod(grid)
    layers = tuple(sorted(set(int(l) for l in layers)))
    ctx = autocast or contextlib.nullcontext
    depth = len(encoder.blocks)
    if total <= max_tokens:
        tiles = [(tuple(slice(0, g) for g in grid),) * 3]
        x_full = torch.from_numpy(prepared)[None, None]  # shares memory with the array: no copy
    else:
        side = max(4, int(round(max_tokens ** (1 / 3))))  # cubic windows of about max_tokens patches
        window = [min(g, side) for g in grid]
        tiles = grid_tiles(grid, window, min(halo, side // 4))
        pad = [g * p - s for g, p, s in zip(grid, patch, prepared.shape)]
        x_full = torch.nn.functional.pad(torch.from_numpy(prepared)[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))
    state = {"tile": 0}

    def on_block(n: int) -> None:
        if progress is not None:
            progress("encode", (state["tile"] * depth + n) / (len(tiles) * depth))

    handles = _block_progress(encoder, on_block)
    dim = encoder.config.embed_dim
    try:
        if len(tiles) == 1:
            with ctx():
                out = encoder(x_full.to(device), return_layers=layers)
            tokens = out.patch_tokens[0].float().cpu()
            got = {l: out.layers[l][0].float().cpu() for l in layers}
            return out.cls[0].float().cpu(), tokens, tuple(grid), got, 1
        tokens = torch.empty((*grid, dim), dtype=torch.float32)
        got = {l: torch.empty((*grid, dim), dtype=torch.float32) for l in layers}
        cls_sum, weight = torch.zeros(dim), 0
        for t, (core, win, inner) in enumerate(tiles):
            state["tile"] = t
            vox = tuple(slice(s.start * p, s.stop * p) for s, p in zip(win, patch))
            with ctx():
                out = encoder(x_full[(slice(None), slice(None), *vox)].to(device), return_layers=layers)
            wgrid = tuple(s.stop - s.start for s in win)
            tokens[core] = out.patch_tokens[0].float().view(*wgrid, dim)[inner].cpu()
            for l in layers:
                got[l][core] = out.layers[l][0].float().view(*wgrid, dim)[inner].cpu()
            n_core = math.prod(s.stop - s.start for s in core)
            cls_sum += out.cls[0].float().cpu() * n_core
            weight += n_core
        return (cls_sum / weight, tokens.view(total, dim), tuple(grid),
                {l: v.view(total, dim) for l, v in got.items()}, len(tiles))
    finally:
        for h in handles:
            h.remove()
