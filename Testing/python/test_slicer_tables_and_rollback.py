"""Retrieval tables and the all-or-nothing scene transaction, on Slicer's real scene (slicer-core)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DecipherMR"))

from DecipherMRLib import (  # noqa: E402
    SceneTransaction,
    SegmentLabel,
    array_from_volume_node,
    excerpt_of,
    load_case,
    retrieval_row,
    show_as_foreground,
    threshold_to_segment,
    write_heatmap,
    write_retrieval_table,
    write_segmentation,
)
from decipher_mr import assets  # noqa: E402
from slicer_scenes import add_colin27  # noqa: E402


def scene_with_t1():
    scene = slicer.vtkMRMLScene()
    composite = slicer.vtkMRMLSliceCompositeNode()
    composite.SetLayoutName("Red")
    scene.AddNode(composite)
    node = add_colin27(scene)
    node.CreateDefaultDisplayNodes()
    composite.SetBackgroundVolumeID(node.GetID())
    composite.SetForegroundOpacity(0.0)
    return scene, node, composite


def scene_state(scene):
    nodes = scene.GetNodes()
    return sorted((nodes.GetItemAsObject(i).GetID(), nodes.GetItemAsObject(i).GetName()) for i in range(nodes.GetNumberOfItems()))


HITS = [
    {"score": 0.91, "study_id": "S-0042", "report": "FINDINGS: " + "A rim-enhancing lesion in the left frontal lobe. " * 5, "image": ""},
    {"score": 0.55, "study_id": "S-0007", "report": "No abnormality.", "image": str(assets.colin27_t1())},
]


def test_retrieval_table_has_rank_score_study_excerpt_and_keeps_the_full_report():
    scene, t1, _ = scene_with_t1()
    table = write_retrieval_table(scene, HITS, "Similar reports", reference_node=t1)
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names[:4] == ["rank", "score", "study", "excerpt"]
    assert table.GetNumberOfRows() == 2
    first = retrieval_row(table, 0)
    assert (first.rank, first.study) == (1, "S-0042")
    assert first.score == pytest.approx(0.91)
    assert first.report == HITS[0]["report"]
    assert first.excerpt == excerpt_of(HITS[0]["report"]) and len(first.excerpt) <= 121
    assert retrieval_row(table, 1).rank == 2
    with pytest.raises(IndexError, match="Similar reports"):
        retrieval_row(table, 5)


def test_a_retrieved_case_loads_into_the_scene_and_a_missing_one_is_named():
    scene, _, _ = scene_with_t1()
    table = write_retrieval_table(scene, HITS, "Cases")
    case = load_case(scene, table, 1)
    assert case.GetName() == "S-0007"
    assert array_from_volume_node(case).shape == (181, 217, 181)
    with pytest.raises(ValueError, match="S-0042"):
        load_case(scene, table, 0)


def test_a_failed_run_leaves_the_scene_exactly_as_it_was():
    scene, t1, composite = scene_with_t1()
    labels = np.zeros((181, 217, 181), np.uint8)
    labels[80:100, 100:120, 80:100] = 1
    existing = write_segmentation(scene, t1, labels, [SegmentLabel(1, "kept", (1, 0, 0))])
    before = scene_state(scene)

    with pytest.raises(RuntimeError, match="worker crashed"):
        with SceneTransaction(scene, protect=[existing]):
            heat = write_heatmap(scene, t1, array_from_volume_node(t1).astype(np.float32), "anomaly")
            show_as_foreground(scene, heat, t1, opacity=0.6)
            threshold_to_segment(scene, heat, t1, 100.0, "hot", segmentation_node=existing)
            write_retrieval_table(scene, HITS, "Similar reports", reference_node=t1)
            raise RuntimeError("worker crashed")

    assert scene_state(scene) == before
    assert existing.GetSegmentation().GetNumberOfSegments() == 1
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "kept"
    assert composite.GetForegroundVolumeID() is None and composite.GetForegroundOpacity() == 0.0


def test_a_cancelled_run_rolls_back_too_and_a_successful_one_keeps_its_nodes():
    scene, t1, _ = scene_with_t1()
    before = scene_state(scene)
    with pytest.raises(KeyboardInterrupt):
        with SceneTransaction(scene):
            write_retrieval_table(scene, HITS, "Cases")
            raise KeyboardInterrupt
    assert scene_state(scene) == before

    with SceneTransaction(scene) as tx:
        table = write_retrieval_table(scene, HITS, "Cases")
    assert not tx.rolled_back and scene.GetNodeByID(table.GetID()) is table
