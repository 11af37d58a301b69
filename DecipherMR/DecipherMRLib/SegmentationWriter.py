"""Segmentation nodes from label arrays: named, coloured segments on the input volume's grid.

Segments are imported from one label map that carries the reference volume's IJKToRAS, so the binary
labelmap representation has exactly the input's geometry (oblique directions included) and the
segmentation's reference image geometry is the input volume.

Each segment carries its coded concept as Slicer segment terminology (the ``TerminologyEntry`` tag, in the
serialisation of Slicer's vtkSlicerTerminologiesModuleLogic): the SNOMED CT category and type of the
head's label table (``category``/``type`` columns, ``scheme^value^meaning``, see
decipher_mr/bundle/codes.py), the same codes the DICOM-SEG export writes. Without codes a segment keeps
Slicer's default (Tissue/Tissue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import slicer

from .SubjectHierarchy import place_beside
from .VolumeBridge import check_same_grid, read_node_from_file, vtk_image_from_array


@dataclass(frozen=True)
class SegmentLabel:
    """One label of a segmentation head: its value in the label array, its name and RGB colour (0..1).

    >>> SegmentLabel(1, "Precentral_L", (0.9, 0.2, 0.2))
    """

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str = ""  # a Slicer TerminologyEntry string (terminology_entry); "" keeps Slicer's default


# The segmentation category and type context of Slicer's DICOM master list (Slicer 5.10 Terminologies
# resources); codes are "scheme^value^meaning" as in decipher_mr.bundle.codes.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_entry(category: str, type_: str) -> str:
    """Slicer's serialised terminology entry for a category and a type code (each ``scheme^value^meaning``):
    context~category~type~type modifier~region context~region~region modifier.

    >>> terminology_entry("SCT^123037004^Anatomical Structure", "SCT^83251001^Frontal lobe")
    'Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^83251001^Frontal lobe~^^~Anatomic codes - DICOM master list~^^~^^'
    """
    for code in (category, type_):
        parts = code.split("^")
        if len(parts) != 3 or not all(p.strip() for p in parts) or "~" in code:
            raise ValueError(f"terminology code {code!r} must be 'scheme^value^meaning'")
    return "~".join([TERMINOLOGY_CONTEXT, category, type_, "^^", REGION_CONTEXT, "^^", "^^"])


def _codes_module():
    """decipher_mr's label code table (decipher_mr/bundle/codes.py, stdlib only), loaded as a single file so
    that naming a segment never imports the engine (torch); None when the package is not installed."""
    global _CODES
    if _CODES is None:
        import importlib.util

        _CODES = False
        try:
            package = importlib.util.find_spec("decipher_mr")
        except (ImportError, ValueError):
            package = None
        if package is not None and package.submodule_search_locations:
            path = Path(list(package.submodule_search_locations)[0]) / "bundle" / "codes.py"
            spec = importlib.util.spec_from_file_location("_decipher_mr_label_codes", path)
            if path.is_file() and spec is not None and spec.loader is not None:
                import sys

                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # its dataclasses look their module up there
                try:
                    spec.loader.exec_module(module)
                    _CODES = module
                except Exception:  # noqa: BLE001 - an unreadable table only costs the default terminology
                    _CODES = False
    return _CODES or None


_CODES = None


def default_terminology(name: str) -> str:
    """The terminology entry of a segment named ``name`` (a known structure's SNOMED CT codes, as the
    DICOM-SEG export gives a label table without codes); "" (Slicer's default) without decipher_mr.

    >>> default_terminology("frontal lobe").split("~")[2]
    'SCT^83251001^Frontal lobe'
    """
    codes = _codes_module()
    if codes is None:
        return ""
    category, type_ = codes.default_codes(name)
    return terminology_entry("^".join(category), "^".join(type_))


def _row_terminology(row: dict) -> str:
    if row.get("terminology"):
        return str(row["terminology"])
    category, type_ = str(row.get("category") or "").strip(), str(row.get("type") or "").strip()
    return terminology_entry(category, type_) if category and type_ else ""


def distinct_color(index: int) -> tuple[float, float, float]:
    """A colour for label ``index`` that differs visibly from its neighbours (golden-angle hues).

    >>> distinct_color(0)
    """
    import colorsys

    hue = (index * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95)


def labels_from_rows(rows: Iterable[dict]) -> list[SegmentLabel]:
    """Segment labels from a bundle's label table rows (``value``/``index``, ``name``, optional ``color``,
    optional codes ``category``/``type`` or a ready ``terminology`` entry). A background row (value 0) is
    left out: it gets no segment.

    >>> labels_from_rows([{"value": 1, "name": "lesion", "color": "#ff0000"}])
    """
    out = []
    for n, row in enumerate(rows):
        value = int(row.get("value", row.get("index", n + 1)))
        name = str(row.get("name") or f"label {value}")
        color = row.get("color")
        if isinstance(color, str) and color.startswith("#") and len(color) == 7:
            rgb = tuple(int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))
        elif isinstance(color, (list, tuple)) and len(color) == 3:
            rgb = tuple(float(c) / (255.0 if max(color) > 1 else 1.0) for c in color)
        else:
            rgb = distinct_color(n)
        if value == 0 and ("index" in row or "value" in row):
            continue
        out.append(SegmentLabel(value, name, rgb, _row_terminology(row)))  # type: ignore[arg-type]
    return out


def segmentation_logic(scene):
    """The segmentations logic (created once per scene: segments cannot be added before it exists).

    >>> segmentation_logic(scene)
    """
    logic = getattr(scene, "_decipher_segmentation_logic", None)
    if logic is None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        # The scene is a VTK object: a Python attribute keeps the logic alive as long as it.
        scene._decipher_segmentation_logic = logic
    return logic


def new_segmentation_node(scene, reference_node, name: str):
    """An empty segmentation node whose reference geometry is the volume's, beside it in the hierarchy.

    >>> seg = new_segmentation_node(scene, input_node, "MRHead segmentation")
    """
    segmentation_logic(scene)
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    place_beside(scene, node, reference_node)
    return node


def add_label_array(scene, segmentation_node, reference_node, label_array: np.ndarray, labels: Sequence[SegmentLabel]) -> list[str]:
    """Import the given labels of an ``[i, j, k]`` label array as named, coloured segments; returns their ids.

    Labels absent from the array still become (empty) segments, so the segment list always matches the
    head's label table.

    >>> add_label_array(scene, seg, input_node, labels, [SegmentLabel(1, "lesion", (1, 0, 0))])
    """
    check_same_grid(label_array, reference_node, "segmentation")
    label_array = np.asarray(label_array)
    if not np.issubdtype(label_array.dtype, np.integer) and label_array.dtype != np.bool_:
        raise ValueError(f"segmentation: expected an integer label array, got {label_array.dtype}")
    label_array = label_array.astype(np.int16 if label_array.max(initial=0) < 32768 else np.int32)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()  # never added to the scene: a carrier of geometry
    labelmap.CopyOrientation(reference_node)
    labelmap.SetAndObserveImageData(vtk_image_from_array(label_array))

    segmentation = segmentation_node.GetSegmentation()
    before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
    logic = segmentation_logic(scene)
    if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ""):
        raise RuntimeError(f"could not import the label map into segmentation {segmentation_node.GetName()!r}")
    imported = {}
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        if seg_id not in before:
            imported[segmentation.GetSegment(seg_id).GetLabelValue()] = seg_id
    wanted = {lab.value for lab in labels}
    for value, seg_id in imported.items():
        if value not in wanted:  # labels the head's table does not name are dropped, not shown as "Label_7"
            segmentation.RemoveSegment(seg_id)
    ids = []
    for lab in labels:
        seg_id = imported.get(lab.value)
        if seg_id is None:
            seg_id = segmentation.AddEmptySegment("", lab.name, list(lab.color))
        segment = segmentation.GetSegment(seg_id)
        segment.SetName(lab.name)
        segment.SetColor(*lab.color)
        entry = lab.terminology or default_terminology(lab.name)
        if entry:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        ids.append(seg_id)
    # Segments follow the label table's order (the import lists them by value, empty ones last).
    first = len(before)
    for offset, seg_id in enumerate(ids):
        segmentation.SetSegmentIndex(seg_id, first + offset)
    return ids


def write_segmentation(scene, reference_node, label_array: np.ndarray, labels: Sequence[SegmentLabel], name: str | None = None):
    """A new segmentation node holding the label array as named, coloured segments beside the input.

    >>> seg = write_segmentation(scene, input_node, result.labels, labels_from_rows(result.label_table))
    """
    name = name or f"{reference_node.GetName()} segmentation"
    node = new_segmentation_node(scene, reference_node, name)
    add_label_array(scene, node, reference_node, label_array, labels)
    return node


def segment_array(scene, segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """A segment as a 0/1 ``[i, j, k]`` array on the reference volume's grid.

    >>> mask = segment_array(scene, seg, seg.GetSegmentation().GetNthSegmentID(0), input_node)
    """
    import vtk

    from .VolumeBridge import array_from_volume_node

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)  # export needs the node in the scene
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not segmentation_logic(scene).ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node):
            raise RuntimeError(f"could not export segment {segment_id!r}")
        return (array_from_volume_node(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def save_segmentation(segmentation_node, path: str | Path) -> Path:
    """Write a segmentation node as ``.seg.nrrd`` on its full reference grid.

    Slicer writes into a temporary file of the same folder which is renamed into place, so a crash never
    leaves half a file under the real name.

    >>> save_segmentation(seg, "out/MRHead.seg.nrrd")
    """
    import os
    import tempfile

    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation is saved as .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".seg.nrrd", dir=path.parent)
    os.close(fd)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetCropToMinimumExtent(False)
    storage.SetFileName(tmp)
    try:
        if not storage.WriteData(segmentation_node):
            raise RuntimeError(f"{path}: writing the segmentation failed")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_segmentation(scene, path: str | Path, name: str | None = None):
    """Read a ``.seg.nrrd`` into a new segmentation node.

    >>> seg = load_segmentation(scene, "out/MRHead.seg.nrrd")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such segmentation file")
    segmentation_logic(scene)
    return read_node_from_file(
        scene, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(), path,
        name or path.name[: -len(".seg.nrrd")], f"{path}: not a readable segmentation file",
    )
