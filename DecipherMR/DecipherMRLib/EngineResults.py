"""Put the inference engine's answers into the scene.

The engine (``decipher_mr.inference``) answers in the input volume's own geometry: ``SegmentationResult``
(``labels`` Volume + ``label_names``), ``HeatmapResult`` (``heatmap``/``mask`` Volumes, ``peak_ijk``,
``threshold``, ``query``) and lists of ``RetrievalHit`` (``rank``, ``score``, ``metadata``). Objects or
the equivalent dicts (what the worker's JSON carries, with file paths instead of arrays) both work. Each
map is checked against the input node's grid and IJKToRAS before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .Grounding import GroundingResult, write_grounding
from .HeatmapDisplay import show_as_foreground, write_heatmap
from .RetrievalTables import write_retrieval_table
from .SegmentationWriter import SegmentLabel, distinct_color, write_segmentation
from .VolumeBridge import ijk_to_ras


def _get(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


def map_array(value: Any, reference_node, what: str) -> np.ndarray:
    """The ``[i, j, k]`` array of an engine map (a Volume, an array, or a path to a NIfTI/NRRD file),
    after checking that it lies on the reference node's grid.

    >>> scores = map_array(result.heatmap, input_node, "anomaly map")
    """
    if isinstance(value, (str, Path)):
        from decipher_mr.data.io import read_volume

        value = read_volume(value, allow_constant=True)
    array = np.asarray(getattr(value, "array", value))
    shape = tuple(reference_node.GetImageData().GetDimensions())
    if array.shape != shape:
        raise ValueError(f"{what}: shape {array.shape} does not match volume {reference_node.GetName()!r} {shape}")
    affine = getattr(value, "affine_ras", None)
    if affine is not None and not np.allclose(affine, ijk_to_ras(reference_node), atol=1e-3):
        raise ValueError(f"{what}: its geometry differs from volume {reference_node.GetName()!r}; the engine must answer in the input's geometry")
    return array


def apply_segmentation(scene, reference_node, result: Any, name: str | None = None):
    """A segmentation node from a ``SegmentationResult`` (label 0 is background and gets no segment).

    >>> seg_node = apply_segmentation(scene, input_node, session.segment(volume))
    """
    labels = map_array(_get(result, "labels"), reference_node, "segmentation")
    names = list(_get(result, "label_names", []) or [])
    colors = _get(result, "label_colors") or {}
    table = [
        SegmentLabel(value, str(label), tuple(colors.get(label, distinct_color(value - 1))))
        for value, label in enumerate(names)
        if value > 0
    ]
    if not table:
        table = [SegmentLabel(int(v), f"label {int(v)}", distinct_color(int(v) - 1)) for v in np.unique(labels) if v > 0]
    return write_segmentation(scene, reference_node, labels.astype(np.int32), table, name=name)


def apply_anomaly(scene, reference_node, result: Any, opacity: float = 0.5):
    """The anomaly heatmap as a scalar volume shown over the input; returns the heatmap node.

    >>> heat_node = apply_anomaly(scene, input_node, session.anomaly_map(volume), opacity=0.5)
    """
    scores = map_array(_get(result, "heatmap"), reference_node, "anomaly map").astype(np.float32)
    node = write_heatmap(scene, reference_node, scores, f"{reference_node.GetName()} anomaly")
    threshold = _get(result, "threshold")
    if threshold is not None:
        node.SetAttribute("DecipherMR.threshold", str(float(threshold)))
    show_as_foreground(scene, node, reference_node, opacity)
    return node


def apply_grounding(scene, reference_node, result: Any, query: str | None = None, segmentation_node=None) -> GroundingResult:
    """A segment named after the query, a markup at the engine's peak, slice views jumped there.

    >>> found = apply_grounding(scene, input_node, session.ground(volume, "left frontal lobe"))
    """
    heat = map_array(_get(result, "heatmap"), reference_node, "grounding map").astype(np.float32)
    mask = _get(result, "mask")
    mask = None if mask is None else map_array(mask, reference_node, "grounding mask")
    if mask is not None and not np.any(mask):
        mask = None  # nothing above the engine's threshold: fall back to the region around the peak
    text = query or _get(result, "query") or "query"
    return write_grounding(
        scene, reference_node, heat, text, segmentation_node=segmentation_node, mask=mask, peak_ijk=_get(result, "peak_ijk")
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
