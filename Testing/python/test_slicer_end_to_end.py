"""The real Colin27 volume taken through segment, anomaly, text query and retrieval, as the panel does it.

A small bundle is trained in the set-up (``bundle_factory``: real heads, a couple of iterations on the
demo cache) and the demo corpus is indexed with it; ``ModuleLogic`` then drives the real engine on the
runner's background thread and writes into Slicer's real scene.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("decipher_mr.inference")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DecipherMR"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DecipherMRLib import array_from_volume_node, ijk_to_ras, retrieval_row, same_geometry, segment_array, sibling_parent  # noqa: E402
from DecipherMRLib.Engine import InProcessEngine  # noqa: E402
from DecipherMRLib.ModuleLogic import ModuleLogic  # noqa: E402
from DecipherMRLib.Runner import RunState  # noqa: E402
from decipher_mr import assets  # noqa: E402


@pytest.fixture(scope="module")
def bundle_and_index(prepared_demo_cache, demo_corpus, tmp_path_factory):
    from bundle_factory import build_test_bundle

    from decipher_mr.index import build_index
    from decipher_mr.inference import Session

    work = tmp_path_factory.mktemp("slicer_bundle")
    bundle = build_test_bundle(prepared_demo_cache, work)
    build_index(Session.from_bundle(bundle, device="cpu", heads=[]), demo_corpus, work / "index", progress=False)
    return bundle, work / "index"


@pytest.fixture()
def module(bundle_and_index):
    bundle, index = bundle_and_index
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for layout, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        view = scene.CreateNodeByClass("vtkMRMLSliceNode")
        view.SetLayoutName(layout)
        scene.AddNode(view)
        view.SetOrientation(orientation)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(layout)
        scene.AddNode(composite)
    t1 = slicer.vtkMRMLScalarVolumeNode()
    t1.SetName("Colin27")
    scene.AddNode(t1)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(assets.colin27_t1()))
    t1.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(t1)
    logic = ModuleLogic(scene, engine_factory=InProcessEngine)
    logic.configure(str(bundle), device="cpu", index=str(index))
    failures = []
    logic.runner.failed.connect(lambda name, message, details: failures.append((name, message)))
    yield scene, t1, logic, failures
    logic.shutdown()


def run(logic, failures):
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    assert not failures, failures


def test_colin27_segment_anomaly_queries_and_retrieval(module):
    scene, t1, logic, failures = module

    logic.segment(t1)
    run(logic, failures)
    segs = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert segs.GetNumberOfItems() == 1
    seg = segs.GetItemAsObject(0)
    session = logic.engine().session()
    names = list(session.heads["lobes"].config.labels)[1:]
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == names
    assert len({segmentation.GetNthSegment(i).GetColor() for i in range(segmentation.GetNumberOfSegments())}) == len(names)
    reference = np.array(segmentation.GetConversionParameter("Reference image geometry").split(";")[:16], float).reshape(4, 4)
    np.testing.assert_allclose(reference, ijk_to_ras(t1), atol=1e-4)
    assert sibling_parent(scene, seg) == sibling_parent(scene, t1)
    encodes_after_segment = session.stats["encoder_passes"]

    logic.anomaly(t1, opacity=0.4)
    run(logic, failures)
    heat = logic.lastHeatmap
    assert same_geometry(heat, t1)
    scores = array_from_volume_node(heat)
    assert scores.shape == (181, 217, 181) and 0.0 <= scores.min() and scores.max() <= 1.0
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.4)
    logic.setOpacity(0.8)
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)
    seg_node, segment_id = logic.thresholdToSegment(t1, float(np.quantile(scores, 0.99)))
    assert segment_array(scene, seg_node, segment_id, t1).sum() > 0

    logic.query(t1, "lesion in the left frontal lobe")
    run(logic, failures)
    logic.query(t1, "right occipital lobe")
    run(logic, failures)
    # One encoder pass served segmentation, anomaly and both queries: the volume was encoded once.
    assert session.stats["encoder_passes"] == encodes_after_segment == 1
    queries = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    assert queries.GetNumberOfItems() == 2
    query_seg = [scene.GetNodesByClass("vtkMRMLSegmentationNode").GetItemAsObject(i) for i in range(3)][-1]
    names = [query_seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(query_seg.GetSegmentation().GetNumberOfSegments())]
    assert names == ["lesion in the left frontal lobe", "right occipital lobe"]
    markup = queries.GetItemAsObject(1)
    peak = [0.0, 0.0, 0.0]
    markup.GetNthControlPointPosition(0, peak)
    red = scene.GetNthNodeByClass(0, "vtkMRMLSliceNode").GetSliceToRAS()
    assert red.GetElement(2, 3) == pytest.approx(peak[2], abs=1e-3)  # the axial view jumped to the peak

    logic.similarReports(t1, k=3)
    run(logic, failures)
    table = logic.lastTable
    assert [table.GetColumnName(c) for c in range(4)] == ["rank", "score", "study", "excerpt"]
    assert table.GetNumberOfRows() == 3
    rows = [retrieval_row(table, r) for r in range(3)]
    assert [r.rank for r in rows] == [1, 2, 3] and rows[0].score >= rows[1].score >= rows[2].score
    assert logic.reportOfRow(0) == rows[0].report

    logic.findCases("glioma in the left frontal lobe", reference_node=t1, k=4)
    run(logic, failures)
    cases = logic.lastTable
    assert cases.GetNumberOfRows() == 4
    case = logic.loadCase(0)
    assert array_from_volume_node(case).ndim == 3


def test_an_engine_error_reaches_the_user_and_changes_nothing(module):
    scene, t1, logic, failures = module
    before = scene.GetNumberOfNodes()
    logic.query(t1, "x" * 5000)  # longer than the text tower reads: the engine refuses it
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    assert failures and failures[-1][0] == "query"
    assert scene.GetNumberOfNodes() == before
    with pytest.raises(ValueError, match="type what"):
        logic.query(t1, "   ")
