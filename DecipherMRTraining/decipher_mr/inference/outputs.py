"""Writing what the engine answered: volumes (NIfTI or NRRD), one JSON summary, PNG previews.

Every volume is written in the input's geometry (the results already are). A preview shows three
orthogonal slices through the result's peak (or the volume centre), the input in grey under the
result in colour, each slice reoriented to RAS display axes and scaled to millimetres. All files are
written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from decipher_mr.data.preprocess import canonicalize
from decipher_mr.data.volume import Volume, write_volume
from decipher_mr.storage import atomic_path, atomic_write_json

from .results import HeatmapResult, LocalizationResult, SegmentationResult

FORMATS = {"nii.gz": ".nii.gz", "nifti": ".nii.gz", "nrrd": ".nrrd"}
PREVIEW_PANEL = 192  # pixels on the longer side of each panel


def _suffix(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def safe_name(text: str, limit: int = 40) -> str:
    """A file-name-safe slug of a query or label (``left frontal lobe`` -> ``left-frontal-lobe``)."""
    slug = "".join(c if c.isalnum() else "-" for c in text.lower())
    slug = "-".join(p for p in slug.split("-") if p)
    return slug[:limit].strip("-") or "query"


def _ras_view(vol: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    canon, _, _ = canonicalize(vol)
    return canon.array, canon.spacing


def _panel(gray: np.ndarray, over: np.ndarray | None, aspect: tuple[float, float], labels: bool):
    from PIL import Image

    lo, hi = np.percentile(gray, (1, 99)) if gray.size else (0, 1)
    g = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.stack([g, g, g], -1)
    if over is not None:
        if labels:
            palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                                [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], float) / 255
            idx = over.astype(int)
            color = palette[idx % len(palette)]
            alpha = np.where(idx > 0, 0.45, 0.0)[..., None]
        else:
            o = np.clip(over, 0, 1)
            color = np.stack([np.ones_like(o), o, np.zeros_like(o)], -1)  # red -> yellow
            alpha = (0.6 * o)[..., None]
        rgb = rgb * (1 - alpha) + color * alpha
    # display rows go superior/anterior to the top: the RAS second axis increases upward
    img = np.flipud(np.transpose(rgb, (1, 0, 2)))
    h_mm, w_mm = img.shape[0] * aspect[1], img.shape[1] * aspect[0]
    scale = PREVIEW_PANEL / max(h_mm, w_mm)
    size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
    return Image.fromarray((img * 255).astype(np.uint8)).resize(size, Image.BILINEAR)


def write_preview(image: Volume, result: Volume, dest: str | Path, labels: bool = False) -> Path:
    """PNG with axial, coronal and sagittal slices of ``result`` over ``image`` through its peak.

    >>> write_preview(vol, seg.labels, "out/segmentation.png", labels=True)
    """
    from PIL import Image

    gray, sp = _ras_view(image)
    over, _ = _ras_view(result)
    ras_point = [s // 2 for s in gray.shape]
    if over.max() > 0:
        ras_point = list(np.unravel_index(int(np.argmax(over)), over.shape))
    i, j, k = (int(v) for v in ras_point)
    panels = [
        _panel(gray[:, :, k], over[:, :, k], (sp[0], sp[1]), labels),   # axial: R right, A up
        _panel(gray[:, j, :], over[:, j, :], (sp[0], sp[2]), labels),   # coronal: R right, S up
        _panel(gray[i, :, :], over[i, :, :], (sp[1], sp[2]), labels),   # sagittal: A right, S up
    ]
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    with atomic_path(dest, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return Path(dest)


def write_results(out: str | Path, image: Volume, results: dict[str, Any], fmt: str = "nii.gz",
                  previews: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every result into ``out`` and return the summary (also written as ``summary.json``).

    ``results`` maps an output name (``segmentation``, ``anomaly``, ``localization``,
    ``ground-<query>``, ``classification``) to what the session returned.

    >>> write_results("out", vol, {"segmentation": s.segment(vol), "anomaly": s.anomaly_map(vol)})
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(fmt)
    summary: dict[str, Any] = {"input": {"path": image.path, "shape": list(image.shape), "spacing": list(image.spacing),
                                         "origin": list(image.origin),
                                         "direction": np.asarray(image.direction).flatten().tolist()},
                               "outputs": {}, **(extra or {})}
    for name, res in results.items():
        entry: dict[str, Any]
        if isinstance(res, SegmentationResult):
            entry = {**res.summary(), "file": str(write_volume(res.labels, out / f"{name}{suffix}"))}
            if previews:
                entry["preview"] = str(write_preview(image, res.labels, out / f"{name}.png", labels=True))
        elif isinstance(res, HeatmapResult):
            entry = {**res.summary(), "file": str(write_volume(res.heatmap, out / f"{name}{suffix}")),
                     "mask_file": str(write_volume(res.mask, out / f"{name}-mask{suffix}"))}
            if previews:
                entry["preview"] = str(write_preview(image, res.heatmap, out / f"{name}.png"))
        elif isinstance(res, LocalizationResult):
            entry = res.summary()
            if res.heatmaps:
                stacked = np.zeros(image.shape, np.uint8)
                for n, (label, heat) in enumerate(res.heatmaps.items(), start=1):
                    box = res.structures[label]["box_ijk"]
                    if box is not None:  # boxes drawn as filled label blocks, later ones on top
                        stacked[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = n
                boxes = image.with_array(stacked)
                boxes.path = None
                entry["file"] = str(write_volume(boxes, out / f"{name}-boxes{suffix}"))
                entry["box_labels"] = {n: label for n, label in enumerate(res.heatmaps, start=1)}
                if previews:
                    entry["preview"] = str(write_preview(image, boxes, out / f"{name}.png", labels=True))
        else:
            entry = res if isinstance(res, dict) else {"value": res}
        summary["outputs"][name] = entry
    atomic_write_json(out / "summary.json", json.loads(json.dumps(summary, default=str)))
    return summary
