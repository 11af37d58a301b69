"""What the engine answers, in the input volume's own geometry and, cheaper, on the model's grid.

Every map (``labels``, ``heatmap``, ``mask``) is a :class:`~decipher_mr.data.volume.Volume` with the
input's shape, spacing, origin and direction. The session computes maps on the model's own (prepared,
e.g. 2 mm) grid; those are ``grid_labels``, ``grid_heatmap`` and ``grid_mask``, Volumes with their own
geometry (a viewer that reslices through each volume's IJK->RAS, like 3D Slicer, shows them in place
as they are), and the input-grid maps are resampled from them only when first asked for (an export). Boxes are half-open voxel boxes ``[i0, j0, k0, i1, j1, k1]`` of the input's index grid
(``box_ijk``) and the same box's extent in LPS millimetres (``box_lps`` = min corner, max corner
of the voxel centres it spans); peaks are input voxel indices and LPS points. ``summary()`` gives
the JSON-ready part (no arrays) that the command line and the worker send back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from decipher_mr.data.volume import Volume


def world_point(volume: Volume, ijk) -> list[float]:
    """LPS millimetres of voxel index ``ijk`` of ``volume``."""
    return [float(v) for v in (volume.affine_lps @ np.append(np.asarray(ijk, float), 1.0))[:3]]


def world_box(volume: Volume, box: list[int] | None) -> list[list[float]] | None:
    """``[min_corner, max_corner]`` in LPS mm of the voxel centres inside a half-open index box."""
    if box is None:
        return None
    lo, hi = np.asarray(box[:3], float), np.asarray(box[3:], float) - 1
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (volume.affine_lps @ np.c_[corners, np.ones(8)].T)[:3].T
    return [[float(v) for v in world.min(0)], [float(v) for v in world.max(0)]]


def peak_of(volume: Volume) -> list[int]:
    return [int(v) for v in np.unravel_index(int(np.argmax(volume.array)), volume.shape)]


MAP_GRIDS = ("input", "model")


def input_index(volume: Volume, lps) -> list[int]:
    """The voxel of ``volume`` nearest to an LPS point (clipped to the volume)."""
    ijk = np.linalg.solve(volume.affine_lps, np.append(np.asarray(lps, float), 1.0))[:3]
    return [int(v) for v in np.clip(np.rint(ijk), 0, np.asarray(volume.shape) - 1)]


def input_box(volume: Volume, grid: Volume, box: list[int] | None) -> list[int] | None:
    """A half-open box of ``grid``'s index grid as the half-open box of ``volume``'s voxels it covers."""
    if box is None:
        return None
    lo, hi = np.asarray(box[:3], float) - 0.5, np.asarray(box[3:], float) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = np.linalg.solve(volume.affine_lps, grid.affine_lps @ corners.T)[:3].T
    start = np.clip(np.ceil(ijk.min(0) - 1e-6), 0, volume.shape).astype(int)
    stop = np.clip(np.floor(ijk.max(0) + 1e-6) + 1, 0, volume.shape).astype(int)
    return [int(v) for v in (*start, *stop)]


class _Lazy:
    """An input-grid map made from the grid map on first use (``restore`` is the resampling)."""

    def __init__(self, make: Callable[[], Volume]):
        self.make, self.value = make, None

    def get(self) -> Volume:
        if self.value is None:
            self.value = self.make()
        return self.value


def _as_lazy(value) -> _Lazy:
    lazy = _Lazy(lambda: value)
    lazy.value = value
    return lazy


class SegmentationResult:
    """Label map (uint8, 0 = background) in the input geometry, with its label names; ``grid_labels``
    is the same on the model's grid (``None`` when the result was built from input-grid maps only).
    ``label_codes`` holds each foreground label's coded concept from the bundle's label table
    (``{"value", "name", "category", "type", "coded"}``, codes ``scheme^value^meaning``, see
    :mod:`decipher_mr.bundle.codes`); None when unknown.

    >>> seg = session.segment("t1.nii.gz"); seg.labels.shape == vol.shape; seg.label_names[1]
    """

    def __init__(self, head: str, labels: Volume | None, label_names: list[str], grid_labels: Volume | None = None,
                 to_input: Callable[[], Volume] | None = None, label_codes: list[dict[str, Any]] | None = None):
        self.head, self.label_names, self.grid_labels = head, list(label_names), grid_labels
        self.label_codes = [dict(c) for c in label_codes] if label_codes is not None else None
        self._labels = _as_lazy(labels) if labels is not None else _Lazy(to_input)

    @property
    def labels(self) -> Volume:
        return self._labels.get()

    def summary(self, grid: str = "input") -> dict[str, Any]:
        """JSON-ready facts; ``grid="model"`` counts volumes on the model grid (no resampling)."""
        labels = self.grid_labels if grid == "model" and self.grid_labels is not None else self.labels
        voxel_ml = float(np.prod(labels.spacing)) / 1000.0
        counts = np.bincount(labels.array.ravel(), minlength=len(self.label_names))
        out = {"head": self.head, "labels": self.label_names,
               "volume_ml": {name: round(float(counts[i]) * voxel_ml, 3)
                             for i, name in enumerate(self.label_names) if i > 0}}
        if self.label_codes is not None:
            out["label_codes"] = [dict(c) for c in self.label_codes]
        return out


class HeatmapResult:
    """A [0, 1] map in the input geometry, the mask of its largest above-threshold component, and
    its box and peak (anomaly maps and text grounding).

    Built from input-grid maps (``HeatmapResult(head, heatmap, mask, box_ijk, peak_ijk, threshold)``)
    or, by the session, from grid maps (``grid=(grid_heatmap, grid_mask, grid_box, grid_peak)`` plus
    ``to_input`` making the input-grid ``(heatmap, mask, box_ijk, peak_ijk)`` on first use).

    >>> g = session.ground("t1.nii.gz", "left frontal lobe"); g.heatmap.array.max(), g.box_ijk
    """

    def __init__(self, head: str, heatmap: Volume | None = None, mask: Volume | None = None,
                 box_ijk: list[int] | None = None, peak_ijk: list[int] | None = None, threshold: float = 0.5,
                 query: str | None = None, grid: tuple | None = None, source: Volume | None = None,
                 to_input: Callable[[], tuple] | None = None):
        self.head, self.threshold, self.query = head, float(threshold), query
        self.grid_heatmap, self.grid_mask, self.grid_box, self.grid_peak = grid or (None, None, None, None)
        self.source = source  # the input's geometry (a zero-stride array), for grid -> input indices
        self._input = _as_lazy((heatmap, mask, box_ijk, peak_ijk)) if heatmap is not None else _Lazy(to_input)

    heatmap = property(lambda self: self._input.get()[0])
    mask = property(lambda self: self._input.get()[1])
    box_ijk = property(lambda self: self._input.get()[2])
    peak_ijk = property(lambda self: self._input.get()[3])

    @property
    def box_lps(self) -> list[list[float]] | None:
        return world_box(self.heatmap, self.box_ijk)

    @property
    def peak_lps(self) -> list[float]:
        return world_point(self.heatmap, self.peak_ijk)

    def summary(self, grid: str = "input") -> dict[str, Any]:
        """JSON-ready facts. ``grid="model"`` answers from the grid maps without resampling: the peak is
        the grid peak's exact point (``peak_lps``) and the input voxel nearest to it, the box the input
        voxels the grid box covers; ``grid_box_ijk``/``grid_peak_ijk`` index the grid maps."""
        if grid == "model" and self.grid_heatmap is not None and self.source is not None:
            g = self.grid_heatmap
            peak_lps = world_point(g, self.grid_peak)
            box = input_box(self.source, g, self.grid_box)
            out = {"head": self.head, "max": float(g.array.max()), "threshold": self.threshold,
                   "mask_voxels": int(self.grid_mask.array.sum()), "box_ijk": box,
                   "box_lps": world_box(g, self.grid_box), "peak_ijk": input_index(self.source, peak_lps),
                   "peak_lps": peak_lps, "map_grid": "model", "grid_box_ijk": self.grid_box,
                   "grid_peak_ijk": self.grid_peak}
        else:
            out = {"head": self.head, "max": float(self.heatmap.array.max()), "threshold": self.threshold,
                   "mask_voxels": int(self.mask.array.sum()), "box_ijk": self.box_ijk, "box_lps": self.box_lps,
                   "peak_ijk": self.peak_ijk, "peak_lps": self.peak_lps}
        if self.query is not None:
            out["query"] = self.query
        return out


def result_maps(result, grid: str = "input") -> dict[str, Volume]:
    """The maps to send back for ``grid`` (``"input"``: the input's grid; ``"model"``: the model's grid
    when the result has it): ``labels`` for a segmentation, ``heatmap`` and ``mask`` otherwise.

    >>> result_maps(session.ground(vol, "lesion"), "model")["heatmap"].shape   # the prepared grid's
    """
    if grid not in MAP_GRIDS:
        raise ValueError(f"map grid must be one of {', '.join(MAP_GRIDS)}, got {grid!r}")
    native = grid == "model"
    if isinstance(result, SegmentationResult):
        return {"labels": result.grid_labels if native and result.grid_labels is not None else result.labels}
    if native and result.grid_heatmap is not None:
        return {"heatmap": result.grid_heatmap, "mask": result.grid_mask}
    return {"heatmap": result.heatmap, "mask": result.mask}


@dataclass
class LocalizationResult:
    """Per named structure: box and peak in the input geometry, a score, and (kept) its heatmap.

    >>> loc = session.localize("t1.nii.gz"); loc.structures["frontal"]["box_ijk"]
    """

    head: str
    structures: dict[str, dict[str, Any]] = field(default_factory=dict)
    heatmaps: dict[str, Volume] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"head": self.head, "structures": self.structures}


@dataclass
class RetrievalHit:
    """One retrieved report or case: rank, cosine similarity and what is known about it."""

    rank: int
    score: float
    position: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self, include_report: bool = False) -> dict[str, Any]:
        meta = {k: v for k, v in self.metadata.items() if include_report or k != "report"}
        return {"rank": self.rank, "score": round(self.score, 6), "position": self.position, **meta}
