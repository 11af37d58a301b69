"""Retrieval results as table nodes: rank, score, study, excerpt (plus the full report and image path).

The full report and the image path sit in their own columns so that selecting a row can show the report
and load the case without another round trip to the worker; the widget hides those two columns. Report
text is patient data: it lives in the scene only, never in a log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import vtk

import slicer

from .SubjectHierarchy import place_beside
from .VolumeBridge import read_node_from_file

VISIBLE_COLUMNS = ("rank", "score", "study", "excerpt")
HIDDEN_COLUMNS = ("report", "image")
EXCERPT_CHARS = 120


@dataclass(frozen=True)
class RetrievalRow:
    """One row of a retrieval table, as read back.

    >>> row = retrieval_row(table, 0); row.rank, row.score, row.study
    """

    rank: int
    score: float
    study: str
    excerpt: str
    report: str
    image: str


def excerpt_of(report: str, limit: int = EXCERPT_CHARS) -> str:
    """The first words of a report on one line, cut at a word boundary.

    >>> excerpt_of("FINDINGS: a 12 mm lesion ...", limit=20)
    """
    text = " ".join(str(report or "").split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut or text[:limit]) + "…"


def _field(hit: Mapping[str, Any] | Any, *names: str, default: Any = "") -> Any:
    for name in names:
        if isinstance(hit, Mapping) and hit.get(name) is not None:
            return hit[name]
        if not isinstance(hit, Mapping) and getattr(hit, name, None) is not None:
            return getattr(hit, name)
    return default


def write_retrieval_table(scene, hits: Iterable[Mapping[str, Any] | Any], name: str, reference_node=None):
    """A table node with one row per hit, best first.

    A hit is a mapping (or object) with ``score`` and optionally ``study_id``/``study``, ``report``/
    ``report_text``, ``excerpt`` and ``image``/``image_path``; ``rank`` defaults to the position.

    >>> table = write_retrieval_table(scene, [{"score": 0.83, "study_id": "S12", "report": "..."}], "Similar reports")
    """
    table = slicer.vtkMRMLTableNode()
    table.SetName(scene.GenerateUniqueName(name))
    columns = {}
    for col, kind in (("rank", vtk.vtkIntArray), ("score", vtk.vtkDoubleArray)):
        arr = kind()
        arr.SetName(col)
        columns[col] = arr
    for col in ("study", "excerpt", *HIDDEN_COLUMNS):
        arr = vtk.vtkStringArray()
        arr.SetName(col)
        columns[col] = arr
    for position, hit in enumerate(hits, start=1):
        report = str(_field(hit, "report", "report_text"))
        columns["rank"].InsertNextValue(int(_field(hit, "rank", default=position)))
        columns["score"].InsertNextValue(float(_field(hit, "score", default=float("nan"))))
        columns["study"].InsertNextValue(str(_field(hit, "study_id", "study", "id")))
        columns["excerpt"].InsertNextValue(str(_field(hit, "excerpt", default=excerpt_of(report))))
        columns["report"].InsertNextValue(report)
        columns["image"].InsertNextValue(str(_field(hit, "image", "image_path")))
    for col in (*VISIBLE_COLUMNS, *HIDDEN_COLUMNS):
        table.AddColumn(columns[col])
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetLocked(True)  # results, not a spreadsheet: edits would silently disagree with the index
    scene.AddNode(table)
    if reference_node is not None:
        place_beside(scene, table, reference_node)
    return table


def retrieval_row(table, row: int) -> RetrievalRow:
    """Read one row of a retrieval table back (the widget shows ``.report`` when a row is selected).

    >>> retrieval_row(table, 0).report
    """
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"table {table.GetName()!r} has {table.GetNumberOfRows()} rows, no row {row}")
    cell = {table.GetColumnName(c): table.GetCellText(row, c) for c in range(table.GetNumberOfColumns())}
    return RetrievalRow(
        rank=int(cell["rank"]),
        score=float(cell["score"]),
        study=cell["study"],
        excerpt=cell["excerpt"],
        report=cell.get("report", ""),
        image=cell.get("image", ""),
    )


def load_case(scene, table, row: int, name: str | None = None):
    """Load a retrieved case's image into the scene as a scalar volume node.

    >>> case_node = load_case(scene, table, 0)
    """
    from pathlib import Path

    hit = retrieval_row(table, row)
    if not hit.image:
        raise ValueError(f"row {row} of {table.GetName()!r} ({hit.study}) has no image path")
    path = Path(hit.image)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the retrieved case's image does not exist")
    if path.is_dir():  # a DICOM series folder: read (and checked) by decipher_mr, like any input volume
        from .VolumeBridge import load_volume_file

        return load_volume_file(scene, path, name=name or hit.study or path.name)
    return read_node_from_file(
        scene, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(), path,
        name or hit.study or path.name,
        f"{path}: could not read the retrieved case's image",
    )
