"""Put the inference engine's answers into the scene.

The engine (``decipher_mr.inference``) answers in the input volume's own geometry: ``SegmentationResult``
(``labels`` Volume + ``label_names``), ``HeatmapResult`` (``heatmap``/``mask`` Volumes, ``peak_ijk``,
``threshold``, ``query``) and lists of ``RetrievalHit`` (``rank``, ``score``, ``metadata``). Objects or
the equivalent dicts (what the worker's JSON carries, with file paths instead of arrays) both work.

Maps come on the model's own grid when the engine has them (``grid_labels``, ``grid_heatmap``,
``grid_mask`` of a session result; the worker's files with ``map_grid: "model"``): they go into the scene
as they are, placed by their own IJKToRAS (Slicer reslices every volume and segment on the fly), which
saves resampling them onto the input's grid on every query; exports and saved segmentations are still
resampled onto the input's grid (the segmentation's reference geometry). ``$DECIPHER_MR_MAP_GRID=input``
asks for input-grid maps instead (the previous path, kept for comparison). A map on the input's grid
is checked against the input node's grid and IJKToRAS before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .Grounding import GroundingResult, write_grounding
from .HeatmapDisplay import show_as_foreground, write_heatmap
from .RetrievalTables import write_retrieval_table
from .SegmentationWriter import (SegmentLabel, add_label_array, distinct_color, new_segmentation_node, terminology_entry,
                                 write_segmentation)
from .VolumeBridge import grid_node, ijk_to_ras

MAP_GRID_ENV = "DECIPHER_MR_MAP_GRID"


def _get(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


def map_grid() -> str:
    """Which grid the engine is asked to answer on: ``"model"`` (default) or ``"input"`` (``$DECIPHER_MR_MAP_GRID``)."""
    return "input" if os.environ.get(MAP_GRID_ENV, "model").strip().lower() == "input" else "model"


def _result_map(result: Any, name: str) -> Any:
    """``grid_<name>`` of a result when it has one (and model-grid maps are wanted), else ``<name>``."""
    if map_grid() == "model":
        native = _get(result, f"grid_{name}")
        if native is not None:
            return native
    return _get(result, name)


def map_volume(value: Any, reference_node, what: str):
    """``(array [i, j, k], grid)`` of an engine map (a Volume, an array, or a path to a NIfTI/NRRD file):
    ``grid`` is None when the map lies on the reference node's grid, else a node carrying the map's own
    grid (``VolumeBridge.grid_node``). A bare array must lie on the reference grid.

    >>> scores, grid = map_volume(result.grid_heatmap, input_node, "anomaly map")
    """
    if isinstance(value, (str, Path)):
        from decipher_mr.data.io import read_volume

        value = read_volume(value, allow_constant=True)
    array = np.asarray(getattr(value, "array", value))
    shape = tuple(reference_node.GetImageData().GetDimensions())
    affine = getattr(value, "affine_ras", None)
    if affine is None:
        if array.shape != shape:
            raise ValueError(f"{what}: shape {array.shape} does not match volume {reference_node.GetName()!r} {shape}")
        return array, None
    if array.ndim != 3:
        raise ValueError(f"{what}: expected a 3D map, got shape {array.shape}")
    if array.shape == shape and np.allclose(affine, ijk_to_ras(reference_node), atol=1e-3):
        return array, None
    _check_overlap(affine, array.shape, reference_node, what)
    return array, grid_node(array.shape, affine)


def _check_overlap(affine, shape, reference_node, what: str) -> None:
    """Refuse a map on its own grid that lies wholly outside the volume (it belongs to another one)."""
    def box(matrix, dims):
        corners = np.array([[x, y, z, 1.0] for x in (0, dims[0] - 1) for y in (0, dims[1] - 1) for z in (0, dims[2] - 1)])
        ras = (np.asarray(matrix) @ corners.T)[:3].T
        return ras.min(0), ras.max(0)

    lo, hi = box(affine, shape)
    ref_lo, ref_hi = box(ijk_to_ras(reference_node), reference_node.GetImageData().GetDimensions())
    if np.any(hi < ref_lo - 1.0) or np.any(lo > ref_hi + 1.0):
        raise ValueError(f"{what}: its grid lies outside volume {reference_node.GetName()!r}; it belongs to another volume")


def map_array(value: Any, reference_node, what: str) -> np.ndarray:
    """The ``[i, j, k]`` array of an engine map, after checking that it lies on the reference node's grid.

    >>> scores = map_array(result.heatmap, input_node, "anomaly map")
    """
    array, grid = map_volume(value, reference_node, what)
    if grid is not None:
        raise ValueError(f"{what}: its geometry differs from volume {reference_node.GetName()!r}; the engine must answer in the input's geometry")
    return array


def apply_segmentation(scene, reference_node, result: Any, name: str | None = None):
    """A segmentation node from a ``SegmentationResult`` (label 0 is background and gets no segment).

    >>> seg_node = apply_segmentation(scene, input_node, session.segment(volume))
    """
    labels, grid = map_volume(_result_map(result, "labels"), reference_node, "segmentation")
    names = list(_get(result, "label_names", []) or [])
    colors = _get(result, "label_colors") or {}
    terms = _label_terminology(_get(result, "label_codes"))
    table = [
        SegmentLabel(value, str(label), tuple(colors.get(label, distinct_color(value - 1))), terms.get(value, ""))
        for value, label in enumerate(names)
        if value > 0
    ]
    if not table:
        table = [SegmentLabel(int(v), f"label {int(v)}", distinct_color(int(v) - 1)) for v in np.unique(labels) if v > 0]
    if grid is None:
        return write_segmentation(scene, reference_node, labels.astype(np.int32), table, name=name)
    node = new_segmentation_node(scene, reference_node, name or f"{reference_node.GetName()} segmentation")
    add_label_array(scene, node, grid, labels.astype(np.int32), table)  # the segments keep the model's grid
    return node


def _label_terminology(codes: Any) -> dict[int, str]:
    """``{value: TerminologyEntry}`` from a result's ``label_codes`` (the bundle label table's codes, which
    the worker sends as an optional field of protocol 2); a label without usable codes is left out and
    gets the terminology of its name (``SegmentationWriter.default_terminology``), as before."""
    out: dict[int, str] = {}
    for item in codes or []:
        try:
            category, type_ = str(item.get("category") or "").strip(), str(item.get("type") or "").strip()
            if category and type_:
                out[int(item["value"])] = terminology_entry(category, type_)
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # a malformed entry only costs that label its coded concept
    return out


def apply_anomaly(scene, reference_node, result: Any, opacity: float = 0.5):
    """The anomaly heatmap as a scalar volume shown over the input; returns the heatmap node.

    >>> heat_node = apply_anomaly(scene, input_node, session.anomaly_map(volume), opacity=0.5)
    """
    scores, grid = map_volume(_result_map(result, "heatmap"), reference_node, "anomaly map")
    node = write_heatmap(scene, reference_node, scores.astype(np.float32), f"{reference_node.GetName()} anomaly", grid=grid)
    threshold = _get(result, "threshold")
    if threshold is not None:
        node.SetAttribute("DecipherMR.threshold", str(float(threshold)))
    show_as_foreground(scene, node, reference_node, opacity)
    return node


def apply_grounding(scene, reference_node, result: Any, query: str | None = None, segmentation_node=None) -> GroundingResult:
    """A segment named after the query, a markup at the engine's peak, slice views jumped there.

    >>> found = apply_grounding(scene, input_node, session.ground(volume, "left frontal lobe"))
    """
    heat, grid = map_volume(_result_map(result, "heatmap"), reference_node, "grounding map")
    mask = _result_map(result, "mask")
    if mask is not None:
        mask, mask_grid = map_volume(mask, reference_node, "grounding mask")
        if (mask_grid is None) != (grid is None) or mask.shape != heat.shape:
            raise ValueError("grounding mask: not on the grounding map's grid")
    if mask is not None and not np.any(mask):
        mask = None  # nothing above the engine's threshold: fall back to the region around the peak
    text = query or _get(result, "query") or "query"
    return write_grounding(
        scene, reference_node, heat.astype(np.float32), text, segmentation_node=segmentation_node, mask=mask,
        peak_ijk=None if grid is not None else _get(result, "peak_ijk"), grid=grid,
    )


def hit_rows(hits: Iterable[Any]) -> list[dict]:
    """Retrieval hits (``RetrievalHit`` or dicts) as table rows.

    >>> hit_rows(session.retrieve_reports(volume, index=index, k=5))
    """
    rows = []
    for hit in hits:
        meta = dict(_get(hit, "metadata", {}) or {})
        if isinstance(hit, dict):
            meta.update(hit)
        rows.append(
            {
                "rank": _get(hit, "rank"),
                "score": _get(hit, "score"),
                "study_id": meta.get("study_id") or meta.get("id") or meta.get("study") or "",
                "report": meta.get("report") or meta.get("report_text") or "",
                "image": meta.get("image_path") or meta.get("image") or "",
            }
        )
    return rows


def apply_retrieval(scene, hits: Iterable[Any], name: str, reference_node=None):
    """A retrieval table node from engine hits.

    >>> table = apply_retrieval(scene, hits, "Similar reports", input_node)
    """
    return write_retrieval_table(scene, hit_rows(hits), name, reference_node=reference_node)
