"""What the page shows of the MRML scene: plain, JSON-ready summaries read from the scene's nodes.

Nothing here changes the scene; :class:`~decipher_mr.viewer.app.ViewerApp` puts these into the page's
state after every change.

>>> items, volumes = scene_summary(scene)
"""

from __future__ import annotations

from typing import Any

LISTED_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLTableNode")


def nodes_of(scene, cls: str) -> list:
    collection = scene.GetNodesByClass(cls)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def short_class(node) -> str:
    return node.GetClassName().replace("vtkMRML", "").replace("Node", "")


def control_points(node) -> list[tuple[str, list[float]]]:
    """(label, RAS) of every control point of a markups node."""
    points = []
    for i in range(node.GetNumberOfControlPoints()):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, ras)
        points.append((node.GetNthControlPointLabel(i), ras))
    return points


def scene_summary(scene) -> tuple[list[dict], list[dict]]:
    """The scene's data nodes (the page's Scene list) and its plain scalar volumes (the input selector)."""
    items, volumes = [], []
    for cls in LISTED_CLASSES:
        for node in nodes_of(scene, cls):
            if node.GetHideFromEditors():
                continue
            entry: dict[str, Any] = {"id": node.GetID(), "name": node.GetName(), "type": short_class(node)}
            if cls == "vtkMRMLSegmentationNode":
                seg = node.GetSegmentation()
                entry["segments"] = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
            elif cls == "vtkMRMLMarkupsFiducialNode":
                entry["points"] = [{"label": label, "ras": [round(v, 2) for v in ras]} for label, ras in control_points(node)]
            elif cls == "vtkMRMLScalarVolumeNode":
                image = node.GetImageData()
                entry["dims"] = list(image.GetDimensions()) if image is not None else []
                if node.GetClassName() == cls:  # not label maps and other subclasses
                    volumes.append({"title": node.GetName(), "value": node.GetID()})
            else:
                entry["rows"] = node.GetNumberOfRows()
            items.append(entry)
    return items, volumes


def hit_rows(lib, table) -> list[dict]:
    """The rows of a retrieval table node as the page lists them (the report itself stays in the table)."""
    rows = []
    for i in range(table.GetNumberOfRows() if table is not None else 0):
        row = lib.retrieval_row(table, i)
        rows.append({"row": i, "rank": i + 1, "study": row.study, "score": round(float(row.score), 3), "excerpt": row.excerpt})
    return rows


def slice_view_position(view, ras) -> list[float] | None:
    """Where a RAS point lies in a slice view: fractions of its width and height (top-left origin), and
    its distance from the displayed slice in slices (0 when the view shows the point's slice)."""
    import vtk

    node = view.get_view_node()
    if node is None:
        return None
    dims = node.GetDimensions()
    if not dims[0] or not dims[1]:
        return None
    ras_to_xy = vtk.vtkMatrix4x4()
    ras_to_xy.DeepCopy(node.GetXYToRAS())
    ras_to_xy.Invert()
    x, y, z, _ = ras_to_xy.MultiplyPoint([*map(float, ras), 1.0])
    return [float(x) / dims[0], 1.0 - float(y) / dims[1], float(z)]


def latest_highlight(scene, slice_views) -> dict | None:
    """The newest query markup's peak and where it lies in each slice view, or None without one."""
    markups = nodes_of(scene, "vtkMRMLMarkupsFiducialNode")
    points = control_points(markups[-1]) if markups else []
    if not points:
        return None
    ras = points[-1][1]
    views = {}
    for view in slice_views:
        position = slice_view_position(view, ras)
        if position is not None:
            views[view.get_singleton_tag()] = position
    return {"ras": [float(v) for v in ras], "views": views, "markup": markups[-1].GetName()}
