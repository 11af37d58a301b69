"""What the engine answers, always in the input volume's own geometry.

Every map is a :class:`~decipher_mr.data.volume.Volume` with the input's shape, spacing, origin and
direction. Boxes are half-open voxel boxes ``[i0, j0, k0, i1, j1, k1]`` of the input's index grid
(``box_ijk``) and the same box's extent in LPS millimetres (``box_lps`` = min corner, max corner
of the voxel centres it spans); peaks are input voxel indices and LPS points. ``summary()`` gives
the JSON-ready part (no arrays) that the command line and the worker send back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class SegmentationResult:
    """Label map (uint8, 0 = background) in the input geometry, with its label names.

    >>> seg = session.segment("t1.nii.gz"); seg.labels.shape == vol.shape; seg.label_names[1]
    """

    head: str
    labels: Volume
    label_names: list[str]

    def summary(self) -> dict[str, Any]:
        voxel_ml = float(np.prod(self.labels.spacing)) / 1000.0
        counts = np.bincount(self.labels.array.ravel(), minlength=len(self.label_names))
        return {"head": self.head, "labels": self.label_names,
                "volume_ml": {name: round(float(counts[i]) * voxel_ml, 3)
                              for i, name in enumerate(self.label_names) if i > 0}}


@dataclass
class HeatmapResult:
    """A [0, 1] map in the input geometry, the mask of its largest above-threshold component, and
    its box and peak (anomaly maps and text grounding).

    >>> g = session.ground("t1.nii.gz", "left frontal lobe"); g.heatmap.array.max(), g.box_ijk
    """

    head: str
    heatmap: Volume
    mask: Volume
    box_ijk: list[int] | None
    peak_ijk: list[int]
    threshold: float
    query: str | None = None

    @property
    def box_lps(self) -> list[list[float]] | None:
        return world_box(self.heatmap, self.box_ijk)

    @property
    def peak_lps(self) -> list[float]:
        return world_point(self.heatmap, self.peak_ijk)

    def summary(self) -> dict[str, Any]:
        out = {"head": self.head, "max": float(self.heatmap.array.max()), "threshold": self.threshold,
               "mask_voxels": int(self.mask.array.sum()), "box_ijk": self.box_ijk, "box_lps": self.box_lps,
               "peak_ijk": self.peak_ijk, "peak_lps": self.peak_lps}
        if self.query is not None:
            out["query"] = self.query
        return out


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
