"""Text-prompted highlights: a segment named after the query, a markup at the peak, slice views jumped to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk

import slicer

from .HeatmapDisplay import mask_to_segment
from .SegmentationWriter import new_segmentation_node
from .SubjectHierarchy import place_beside
from .VolumeBridge import check_same_grid, ijk_to_ras, nearest_ijk


@dataclass
class GroundingResult:
    """What a text query put into the scene.

    >>> result.peak_ras, result.segment_id, result.markup_node.GetName()
    """

    segmentation_node: object
    segment_id: str
    markup_node: object
    peak_ijk: tuple[int, int, int]
    peak_ras: tuple[float, float, float]


def segment_name_for_query(query: str, limit: int = 60) -> str:
    """A readable segment name from a query (one line, trimmed).

    >>> segment_name_for_query("lesion in the left frontal lobe")
    'lesion in the left frontal lobe'
    """
    name = " ".join(str(query).split())
    return name if len(name) <= limit else name[: limit - 1].rstrip() + "…"


def peak_position(heat: np.ndarray, reference_node) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The voxel of the highest score and its RAS position.

    >>> ijk, ras = peak_position(scores, input_node)
    """
    ijk = tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
    ras = ijk_to_ras(reference_node) @ np.array([*ijk, 1.0])
    return ijk, tuple(float(v) for v in ras[:3])  # type: ignore[return-value]


def jump_slice_views(scene, ras: tuple[float, float, float]) -> None:
    """Move every slice view so that it shows the given RAS point (Slicer's own jump, offset mode).

    >>> jump_slice_views(scene, (10.0, -20.0, 35.0))
    """
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]), slicer.vtkMRMLSliceNode.OffsetJumpSlice)


def write_grounding(
    scene,
    reference_node,
    heat: np.ndarray,
    query: str,
    threshold: float | None = None,
    segmentation_node=None,
    jump: bool = True,
    mask: np.ndarray | None = None,
    peak_ijk=None,
    grid=None,
) -> GroundingResult:
    """Turn a grounding heatmap into a segment named after the query plus a markup at its peak.

    ``threshold`` defaults to half-way between the map's median and its peak, which keeps the region
    around the peak whatever the map's scale; the engine's own ``mask`` and ``peak_ijk`` win when given.
    Pass the same ``segmentation_node`` for follow-up queries so
    they gather in one node. ``grid`` (a node carrying the map's grid, ``VolumeBridge.grid_node``): ``heat``
    and ``mask`` lie on the model's grid, not the input's; the segment keeps that grid (Slicer reslices it
    in place), the markup goes to the grid peak's exact RAS point, ``peak_ijk`` is the input voxel there.

    >>> result = write_grounding(scene, input_node, scores, "lesion in the left frontal lobe")
    """
    heat = np.asarray(heat, dtype=np.float32)
    on = grid if grid is not None else reference_node
    check_same_grid(heat, on, f"grounding map for {segment_name_for_query(query)!r}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("grounding map holds NaN or infinite values")
    if grid is not None:
        _, peak_ras = peak_position(heat, grid)
        peak_ijk = nearest_ijk(reference_node, peak_ras)
    elif peak_ijk is None:
        peak_ijk, peak_ras = peak_position(heat, reference_node)
    else:
        peak_ijk = tuple(int(v) for v in peak_ijk)
        peak_ras = tuple(float(v) for v in (ijk_to_ras(reference_node) @ np.array([*peak_ijk, 1.0]))[:3])
    if mask is None:
        if threshold is None:
            threshold = float(np.median(heat) + 0.5 * (heat.max() - np.median(heat)))
        mask = heat >= threshold
    else:
        check_same_grid(mask, on, "grounding mask")
    name = segment_name_for_query(query)
    seg_node = segmentation_node if segmentation_node is not None else new_segmentation_node(
        scene, reference_node, f"{reference_node.GetName()} queries"
    )
    segment_id = mask_to_segment(scene, seg_node, on, np.asarray(mask) > 0, name, color=(0.1, 0.8, 1.0))

    markup = slicer.vtkMRMLMarkupsFiducialNode()
    markup.SetName(scene.GenerateUniqueName(f"{name} peak"))
    scene.AddNode(markup)
    markup.CreateDefaultDisplayNodes()
    markup.AddControlPoint(vtk.vtkVector3d(*peak_ras), name)
    markup.SetAttribute("DecipherMR.query", name)
    place_beside(scene, markup, reference_node)
    if jump:
        jump_slice_views(scene, peak_ras)
    return GroundingResult(seg_node, segment_id, markup, peak_ijk, peak_ras)
