"""Anomaly and grounding heatmaps: a scalar volume shown as the slice views' foreground.

A heatmap lies on the input's grid or, as the engine sends it, on the model's own grid (``grid``: a node
carrying that grid, see ``VolumeBridge.grid_node``); Slicer reslices either through its IJKToRAS.

The heat colour table is transparent at its low end, so where the model sees nothing the anatomy stays
visible; the display window runs from the chosen lower threshold to the map's maximum.
"""

from __future__ import annotations

import numpy as np

import slicer

from .SegmentationWriter import SegmentLabel, add_label_array, new_segmentation_node
from .SubjectHierarchy import place_beside
from .VolumeBridge import add_volume_from_array, array_from_volume_node

HEAT_COLOR_TABLE_NAME = "DecipherMR Heat"
HEAT_COLORS = 256


def _heat_rgba(t: float) -> tuple[float, float, float, float]:
    # black-body ramp: dark red -> red -> yellow -> white, fully transparent at 0.
    r = min(1.0, 0.35 + 1.95 * t)
    g = min(1.0, max(0.0, 2.2 * (t - 0.35)))
    b = min(1.0, max(0.0, 3.0 * (t - 0.7)))
    return r, g, b, 0.0 if t == 0.0 else 1.0


def heat_color_table(scene):
    """The module's heat colour table (created once per scene, found by name afterwards).

    >>> table = heat_color_table(scene)
    """
    nodes = scene.GetNodesByClassByName("vtkMRMLColorTableNode", HEAT_COLOR_TABLE_NAME)
    if nodes.GetNumberOfItems():
        return nodes.GetItemAsObject(0)
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(HEAT_COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(HEAT_COLORS)
    for i in range(HEAT_COLORS):
        table.SetColor(i, f"heat {i}", *_heat_rgba(i / (HEAT_COLORS - 1)))
    table.SetAttribute("Category", "DecipherMR")
    scene.AddNode(table)
    return table


def write_heatmap(scene, reference_node, scores: np.ndarray, name: str, lower_threshold: float | None = None, grid=None):
    """A heatmap scalar volume in the reference volume's geometry (or ``grid``'s) with the heat colour display.

    >>> heat = write_heatmap(scene, input_node, result.scores, "MRHead anomaly")
    """
    scores = np.asarray(scores, dtype=np.float32)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: the heatmap holds NaN or infinite values")
    node = add_volume_from_array(scene, scores, grid if grid is not None else reference_node, name)
    low = float(scores.min()) if lower_threshold is None else float(lower_threshold)
    high = float(scores.max())
    if high <= low:
        high = low + 1e-6
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heat_color_table(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    display.SetLowerThreshold(low)
    display.SetUpperThreshold(high)
    display.ApplyThresholdOn()
    display.SetInterpolate(True)
    place_beside(scene, node, reference_node)
    return node


def slice_composite_nodes(scene) -> list:
    """Every slice view's composite node in the scene (one per view in the application).

    >>> [c.GetLayoutName() for c in slice_composite_nodes(scene)]
    """
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def show_as_foreground(scene, heat_node, background_node, opacity: float = 0.5) -> None:
    """Show the heatmap over the input volume in every slice view.

    >>> show_as_foreground(scene, heat, input_node, opacity=0.4)
    """
    for composite in slice_composite_nodes(scene):
        composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(heat_node.GetID())
        composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))


def set_foreground_opacity(scene, opacity: float) -> None:
    """Set the heatmap (foreground) opacity of every slice view; the widget's slider calls this.

    >>> set_foreground_opacity(scene, 0.7)
    """
    for composite in slice_composite_nodes(scene):
        composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))


def threshold_to_segment(
    scene,
    heat_node,
    reference_node,
    threshold: float,
    name: str,
    segmentation_node=None,
    color: tuple[float, float, float] = (1.0, 0.85, 0.0),
) -> tuple[object, str]:
    """Add the voxels where the heatmap is at least ``threshold`` as one named segment.

    Returns ``(segmentation node, segment id)``; a new segmentation node is made when none is given.

    >>> seg, segment_id = threshold_to_segment(scene, heat, input_node, 0.6, "anomaly > 0.6")
    """
    mask = array_from_volume_node(heat_node) >= threshold
    if segmentation_node is None:
        segmentation_node = new_segmentation_node(scene, reference_node, f"{heat_node.GetName()} segments")
    # the mask lies on the heatmap's own grid (the input's or the model's): it is imported with that geometry
    return segmentation_node, mask_to_segment(scene, segmentation_node, heat_node, mask, name, color)


def mask_to_segment(scene, segmentation_node, reference_node, mask: np.ndarray, name: str, color=(1.0, 0.85, 0.0)) -> str:
    """Add a boolean ``[i, j, k]`` mask on ``reference_node``'s grid (any volume or ``grid_node``) as one
    named, coloured segment; returns its id. The segment keeps that grid; the segmentation's reference
    geometry (what an export or a saved ``.seg.nrrd`` is resampled onto) stays the input's.

    >>> segment_id = mask_to_segment(scene, seg, input_node, scores > 0.5, "hot spots")
    """
    mask = np.asarray(mask).astype(np.uint8)
    (segment_id,) = add_label_array(scene, segmentation_node, reference_node, mask, [SegmentLabel(1, name, tuple(color))])
    return segment_id
