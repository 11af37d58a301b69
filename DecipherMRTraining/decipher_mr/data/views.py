"""The one image view behind the 512-d image embedding: stage 2 trains on it, evaluation and every
served search (``Session.image_embedding``: the index, the worker, the viewer, Slicer) embed it.

A view is a function of the *prepared* array (canonical orientation, model spacing, normalised
intensities), its spacing and the view config that the aligned model records (``image_view`` in its
config and in the bundle):

* ``fit`` (default): the whole prepared volume, resized with one scale factor for all axes so that it
  fits ``size`` voxels, and zero-padded to ``size`` (centred). The whole field of view is seen, the
  body part's proportions are kept; a brain and a spine look different before any lesion does.
  Training draws the scale in [0.85, 1] of the fitting scale and the position within the padding.
* ``crop``: a ``size`` crop at the centre (random position in training), zero-padded where smaller.
* ``resize``: the whole volume resized to ``size`` (proportions lost).
* ``view``: a stage-1 global crop's geometry (``mm`` extents), see
  :func:`decipher_mr.train.ssl.multicrop.global_view`.

>>> v = image_view(prepared, (2.0, 2.0, 2.0), {"mode": "fit", "size": [64, 64, 64]})
>>> v.shape
(64, 64, 64)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

VIEW_MODES = ("fit", "crop", "resize", "view")
DEFAULT_VIEW: dict[str, Any] = {"mode": "fit", "size": [64, 64, 64]}
FIT_SCALE_JITTER = (0.85, 1.0)


def _resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    t = torch.from_numpy(np.array(array, dtype=np.float32))[None, None]  # a copy: cache arrays are read-only maps
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def fit_volume(array: np.ndarray, size: Sequence[int], mode: str = "crop", rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``size`` view of a prepared array by ``mode`` (``fit``, ``crop`` or ``resize``; see the module).

    >>> fit_volume(cache.load(0), (64, 64, 64), "fit")     # the whole volume, proportions kept
    """
    size = tuple(int(s) for s in size)
    if mode == "resize":
        return _resize(array, size)
    arr = np.asarray(array, dtype=np.float32)
    if mode == "fit":
        scale = min(s / a for s, a in zip(size, arr.shape))
        if rng is not None:
            scale *= float(rng.uniform(*FIT_SCALE_JITTER))
        inner = tuple(max(1, min(s, int(round(a * scale)))) for a, s in zip(arr.shape, size))
        small = _resize(arr, inner)
        out = np.zeros(size, dtype=np.float32)
        starts = [int(rng.integers(0, s - i + 1)) if rng is not None else (s - i) // 2 for s, i in zip(size, inner)]
        out[tuple(slice(b, b + i) for b, i in zip(starts, inner))] = small
        return out
    if mode != "crop":
        raise ValueError(f"image view mode must be one of {', '.join(VIEW_MODES)}, not {mode!r}")
    pad = [(max(0, s - a) // 2, max(0, s - a) - max(0, s - a) // 2) for a, s in zip(arr.shape, size)]
    if any(p for pair in pad for p in pair):
        arr = np.pad(arr, pad, mode="constant")
    starts = []
    for a, s in zip(arr.shape, size):
        room = a - s
        starts.append(int(rng.integers(0, room + 1)) if rng is not None and room > 0 else room // 2)
    sl = tuple(slice(b, b + s) for b, s in zip(starts, size))
    return np.ascontiguousarray(arr[sl])


def check_view(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The view config with defaults filled in; ``ValueError`` naming what is wrong."""
    cfg = {**DEFAULT_VIEW, **(cfg or {})}
    if cfg["mode"] not in VIEW_MODES:
        raise ValueError(f"image view mode must be one of {', '.join(VIEW_MODES)}, not {cfg['mode']!r}")
    size = [int(s) for s in cfg["size"]]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"image view size must be three positive integers, not {cfg['size']!r}")
    return {k: v for k, v in {**cfg, "size": size}.items() if k != "augment"}


def image_view(prepared: np.ndarray, spacing: Sequence[float], cfg: dict[str, Any] | None,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """The (X, Y, Z) float32 image view of a prepared array; ``rng=None`` is the deterministic (served) view."""
    cfg = check_view(cfg)
    if cfg["mode"] == "view":
        from decipher_mr.train.ssl.multicrop import global_view

        return global_view(prepared, spacing, cfg["size"], cfg.get("mm"), rng)
    return fit_volume(prepared, cfg["size"], cfg["mode"], rng)
