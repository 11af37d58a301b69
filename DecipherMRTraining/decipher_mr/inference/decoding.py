"""Running heads on cached tokens, without another encoder pass.

Heads that read tokens only (grounding, localization, the unsupervised anomaly model, probes) run
once over the whole token grid. Decoders with full-resolution convolutions (segmentation,
supervised anomaly) run window by window on the patch grid when the volume is larger than a few of
the head's training views: each window spans two views per side, carries a halo of neighbouring
patches for context, and only its core is kept. That bounds memory by the window, not by the
volume (a 512x512x160 series decodes in a few hundred MB), and stays close to training, where the
decoder's instance norms saw one view at a time.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .encoding import EncodedVolume, grid_tiles

PATCH = 8
SINGLE_PASS_VIEWS = 4
WINDOW_VIEWS = 2


def _image(enc: EncodedVolume, device) -> torch.Tensor:
    return torch.from_numpy(enc.prepared)[None, None].to(device)


@torch.inference_mode()
def token_head_maps(head, enc: EncodedVolume, device, text: torch.Tensor | None = None) -> torch.Tensor:
    """(K, X, Y, Z) output of a token-level head (logits or map, as the head returns it)."""
    out = head(enc.output(), image=_image(enc, device), text=text)
    return out[0].float().cpu()


@torch.inference_mode()
def decoder_logits(head, enc: EncodedVolume, device, progress: Callable[[str, float], None] | None = None,
                   halo: int = 1) -> torch.Tensor:
    """(C, X, Y, Z) logits of a full-resolution decoder head over the whole prepared array.

    >>> logits = decoder_logits(bundle.heads["tissue"], session.encode(vol), "cpu")
    """
    crop = list(getattr(head.config, "crop", None) or [64, 64, 64])
    view = [max(1, math.ceil(int(c) / PATCH)) for c in crop]
    grid = enc.grid
    shape = enc.prepared.shape
    # one pass while the volume is at most a few training views (memory stays small); beyond that
    # windows of two views per side with a one-patch halo: few windows, little recomputation
    if math.prod(grid) <= SINGLE_PASS_VIEWS * math.prod(view):
        return head(enc.output(), image=_image(enc, device))[0].float().cpu()
    window = [min(g, WINDOW_VIEWS * v) for g, v in zip(grid, view)]
    halo = min(halo, min(window) // 4)
    padded = np.zeros([g * PATCH for g in grid], np.float32)
    padded[: shape[0], : shape[1], : shape[2]] = enc.prepared
    image = torch.from_numpy(padded)[None, None]
    tiles = grid_tiles(grid, window, halo)
    full: torch.Tensor | None = None
    for t, (core, win, inner) in enumerate(tiles):
        if progress is not None:
            progress("decode", t / len(tiles))
        vox = tuple(slice(s.start * PATCH, s.stop * PATCH) for s in win)
        logits = head(enc.output(win), image=image[(slice(None), slice(None), *vox)].to(device))[0].float().cpu()
        if full is None:
            full = torch.empty((logits.shape[0], *padded.shape), dtype=torch.float32)
        src = tuple(slice(s.start * PATCH, s.stop * PATCH) for s in inner)
        dst = tuple(slice(s.start * PATCH, s.stop * PATCH) for s in core)
        full[(slice(None), *dst)] = logits[(slice(None), *src)]
    assert full is not None
    return full[:, : shape[0], : shape[1], : shape[2]]
