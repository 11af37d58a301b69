"""Spatial pieces shared by the dense heads: token grids, occupancy targets, boxes, sliding windows.

Boxes are ``[i0, j0, k0, i1, j1, k1]`` voxel indices of the prepared grid, half-open (``i1`` is one
past the last voxel), so the box of a one-voxel mask has size 1 and IoU is plain volume arithmetic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi


def token_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, N, D) tokens in C order -> (B, D, gx, gy, gz)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def coordinate_tokens(grid: Sequence[int], device=None) -> torch.Tensor:
    """(N, 3) patch-centre coordinates in [-1, 1] per axis, in the encoder's token order.

    Heads append them to tokens so "left" and "superior" are explicit, whatever the encoder learnt.
    """
    axes = [(torch.arange(g, dtype=torch.float32, device=device) + 0.5) / g * 2 - 1 for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def occupancy(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Fraction of each patch's voxels inside ``mask`` (B, C, X, Y, Z) -> (B, C, gx, gy, gz).

    The input is zero-padded at the high end to whole patches, as the encoder does.
    """
    pad = [(-s) % patch for s in mask.shape[2:]]
    if any(pad):
        mask = F.pad(mask, (0, pad[2], 0, pad[1], 0, pad[0]))
    return F.avg_pool3d(mask.float(), kernel_size=patch, stride=patch)


def upsample_to(grid_logits: torch.Tensor, shape: Sequence[int], patch: int) -> torch.Tensor:
    """(B, C, gx, gy, gz) token logits -> (B, C, X, Y, Z) voxel logits (trilinear, padding cut off)."""
    full = [g * patch for g in grid_logits.shape[2:]]
    up = F.interpolate(grid_logits.float(), size=full, mode="trilinear", align_corners=False)
    return up[..., : shape[0], : shape[1], : shape[2]]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    if not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def box_from_mask(mask: np.ndarray) -> list[int] | None:
    """Half-open bounding box ``[i0, j0, k0, i1, j1, k1]`` of a mask, or ``None`` when it is empty.

    >>> box_from_mask(np.pad(np.ones((2, 3, 4), bool), 1))
    [1, 1, 1, 3, 4, 5]
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return [int(v) for v in (*lo, *hi)]


def box_from_heatmap(heat: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Box of the largest above-threshold component; a heatmap that never crosses the threshold
    gives the box of its top 1 % voxels, so a head always answers with a box."""
    mask = largest_component(heat >= threshold)
    if not mask.any():
        mask = largest_component(heat >= np.quantile(heat, 0.99))
    box = box_from_mask(mask)
    assert box is not None
    return box


def box_iou(a: Sequence[int] | None, b: Sequence[int] | None) -> float:
    """IoU of two half-open voxel boxes (0 when either is missing).

    >>> box_iou([0, 0, 0, 2, 2, 2], [1, 0, 0, 3, 2, 2])
    0.333...
    """
    if a is None or b is None:
        return 0.0
    inter = 1
    for d in range(3):
        lo, hi = max(a[d], b[d]), min(a[d + 3], b[d + 3])
        if hi <= lo:
            return 0.0
        inter *= hi - lo
    vol = lambda x: int(np.prod([x[d + 3] - x[d] for d in range(3)]))  # noqa: E731
    return inter / float(vol(a) + vol(b) - inter)


def sliding_window_predict(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                           roi: Sequence[int], overlap: float = 0.25) -> torch.Tensor:
    """Run ``predict`` (B, 1, *roi) -> (B, C, *roi) over a volume of any size.

    Volumes no larger than ``roi`` are predicted in one call (padded up to whole 8-voxel patches by
    the encoder); larger ones go through :func:`monai.inferers.sliding_window_inference` with
    Gaussian blending.

    >>> logits = sliding_window_predict(lambda x: head(encoder(x, return_layers=head.required_layers), image=x), vol, (64, 64, 64))
    """
    if all(s <= r for s, r in zip(image.shape[2:], roi)):
        return predict(image)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(image, roi_size=tuple(int(r) for r in roi), sw_batch_size=1, predictor=predict,
                                    overlap=overlap, mode="gaussian")


def centre_view(array: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...], tuple[slice, ...]]:
    """Zero-pad then centre-crop ``array`` to ``size`` (any dtype).

    Returns the view and the two index tuples that map it back: ``original[src] == view[dst]``.

    >>> view, src, dst = centre_view(cache.load(0), (64, 80, 64))
    """
    out = np.zeros(tuple(int(s) for s in size), dtype=array.dtype)
    src, dst = [], []
    for a, s in zip(array.shape, size):
        if a >= s:
            start = (a - s) // 2
            src.append(slice(start, start + s))
            dst.append(slice(0, s))
        else:
            start = (s - a) // 2
            src.append(slice(0, a))
            dst.append(slice(start, start + a))
    out[tuple(dst)] = array[tuple(src)]
    return out, tuple(src), tuple(dst)


@torch.no_grad()
def predict_volume(encoder, head, array: np.ndarray, crop: Sequence[int], text: torch.Tensor | None = None,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits of a dense head (segment, anomaly, ground, localize) for a whole prepared array.

    The array is padded up to at least ``crop`` (centred, as in training) so the encoder sees the
    training grid, predicted in one pass or by sliding windows of ``crop``, and cut back to the
    array's own shape: the result is (C, X, Y, Z) on the array's grid.

    >>> logits = predict_volume(encoder, head, cache.load(0), head.config.crop)
    """
    size = [max(a, c) for a, c in zip(array.shape, crop)]
    view, src, dst = centre_view(np.asarray(array, dtype=np.float32), size)
    x = torch.from_numpy(view)[None, None].to(device)
    layers = tuple(getattr(head, "required_layers", ()))

    def predict(window: torch.Tensor) -> torch.Tensor:
        out = encoder(window, return_layers=layers)
        t = None if text is None else text.to(window.device).expand(window.shape[0], -1)
        return head(out, image=window, text=t).float()

    logits = sliding_window_predict(predict, x, crop)[0]
    full = torch.zeros((logits.shape[0], *array.shape), dtype=logits.dtype)
    full[(slice(None), *src)] = logits[(slice(None), *dst)].cpu()
    return full


def peak_voxel(grid_logits: np.ndarray, shape: Sequence[int], patch: int = 8, heat: np.ndarray | None = None,
               threshold: float = 0.5) -> list[int]:
    """The pointing answer.

    With ``heat``: the voxel of the largest above-threshold component nearest to that component's
    heat-weighted centroid. A raw argmax is a poor point: a head that uses coordinates saturates
    along a trend and its maximum drifts to the volume's border. Without a component, the centre
    voxel of the highest-scoring token.
    """
    if heat is not None:
        comp = largest_component(heat >= threshold)
        if comp.any():
            idx = np.argwhere(comp)
            w = heat[comp].astype(np.float64)
            centroid = (idx * w[:, None]).sum(0) / w.sum()
            return [int(v) for v in idx[np.argmin(((idx - centroid) ** 2).sum(1))]]
    idx = np.unravel_index(int(np.argmax(grid_logits)), grid_logits.shape)
    return [int(min(i * patch + patch // 2, s - 1)) for i, s in zip(idx, shape)]
