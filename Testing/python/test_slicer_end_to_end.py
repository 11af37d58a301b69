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
from slicer_scenes import add_colin27, scene_with_slice_views  # noqa: E402


@pytest.fixture(scope="module")
def bundle_and_index(prepared_demo_cache, demo_corpus, tmp_path_factory):
    from bundle_factory import build_test_bundle

    from decipher_mr.index import build_index
    from decipher_mr.inference import Session

    work = tmp_path_factory.mktemp("slicer_bundle")
    bundle = build_test_bundle(prepared_demo_cache, work, tasks=("segment", "anomaly", "ground"))
    build_index(Session.from_bundle(bundle, device="cpu", heads=[]), demo_corpus, work / "index", progress=False)
    return bundle, work / "index"


@pytest.fixture()
def module(bundle_and_index):
    bundle, index = bundle_and_index
    scene = scene_with_slice_views()
    t1 = add_colin27(scene)
    logic = ModuleLogic(scene, engine_factory=InProcessEngine)
    logic.configure(str(bundle), device="cpu", index=str(index))
    failures = []
    logic.runner.failed.connect(lambda name, message, details: failures.append((name, message)))
    yield scene, t1, logic, failures
    logic.shutdown()


def logic_volume(node):
    from DecipherMRLib.VolumeBridge import volume_from_node

    return volume_from_node(node)


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
    # shown on the model's own grid, placed by its IJK->RAS (Slicer reslices it over the input)
    np.testing.assert_allclose(ijk_to_ras(heat), session.anomaly_map(logic_volume(t1)).grid_heatmap.affine_ras, atol=1e-4)
    scores = array_from_volume_node(heat)
    assert 0.0 <= scores.min() and scores.max() <= 1.0
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


# --- the same panel actions through the persistent worker process --------------------------------------


@pytest.fixture(scope="module")
def worker_module(bundle_and_index):
    """One scene and one worker shared by the worker tests (starting a worker loads torch and the bundle)."""
    pytest.importorskip("decipher_mr.inference.client")
    from DecipherMRLib.Engine import WorkerEngine

    bundle, index = bundle_and_index
    scene = slicer.vtkMRMLScene()
    t1 = add_colin27(scene)
    logic = ModuleLogic(scene, engine_factory=WorkerEngine)
    logic.configure(str(bundle), device="cpu", index=str(index))
    events = []
    logic.runner.failed.connect(lambda name, message, details: events.append(("failed", name, message)))
    logic.runner.cancelled.connect(lambda name: events.append(("cancelled", name)))
    logic.runner.finished.connect(lambda name, result: events.append(("finished", name)))
    logic.runner.progress.connect(lambda fraction, message: events.append(("progress", message)))
    yield scene, t1, logic, events
    logic.shutdown()


def busy_worker(logic):
    """Give the worker a slow request of its own (an unseen volume), so the next one waits in its queue."""
    client = logic.engine().client(lambda fraction, message: None)
    return client.submit("segment", {"volume": str(assets.colin27_t1("ch2bet"))})


def wait_until_submitted(logic, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while logic.engine()._handle is None:
        assert time.monotonic() < deadline, "the runner never sent its request"
        time.sleep(0.005)


def test_segment_query_and_retrieval_through_the_worker_with_progress(worker_module):
    scene, t1, logic, events = worker_module
    logic.segment(t1)
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    assert events[-1] == ("finished", "segment"), events[-1]
    assert any(kind == "progress" and "Encoding" in message for kind, message in [e[:2] for e in events if e[0] == "progress"])
    seg = scene.GetNodesByClass("vtkMRMLSegmentationNode").GetItemAsObject(0)
    assert seg.GetSegmentation().GetNumberOfSegments() > 0

    logic.query(t1, "lesion in the left frontal lobe")
    logic.runner.wait(timeout=300)
    logic.query(t1, "left occipital lobe")
    logic.runner.wait(timeout=300)
    assert [e for e in events if e[0] != "progress"][-2:] == [("finished", "query"), ("finished", "query")]
    stats = logic.engine().client(lambda f, m: None).request("info", timeout=60)["stats"]
    assert stats["encoder_passes"] == 1  # the worker kept the encoded volume: queries ran no encoder pass

    logic.similarReports(t1, k=2)
    logic.runner.wait(timeout=300)
    assert events[-1] == ("finished", "similar reports")
    assert logic.lastTable.GetNumberOfRows() == 2 and retrieval_row(logic.lastTable, 0).study
    leftovers = [p for p in (logic.engine().folder / "out").rglob("*") if p.is_file()]
    assert not leftovers, leftovers  # result files are read back and removed


def test_cancel_while_queued_in_the_worker_leaves_the_scene_unchanged(worker_module):
    scene, t1, logic, events = worker_module
    before = scene.GetNumberOfNodes()
    slow = busy_worker(logic)
    logic.anomaly(t1)
    wait_until_submitted(logic)
    logic.runner.cancel()
    assert logic.runner.state is RunState.CANCELLING
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    assert events[-1] == ("cancelled", "anomaly map")
    assert scene.GetNumberOfNodes() == before
    slow.result(timeout=300)


def test_a_crashed_worker_is_a_clear_error_and_the_next_run_starts_a_new_one(worker_module):
    import os
    import signal

    scene, t1, logic, events = worker_module
    before = scene.GetNumberOfNodes()
    busy_worker(logic)
    logic.segment(t1)
    wait_until_submitted(logic)
    first_pid = logic.engine()._client.process.pid
    os.kill(first_pid, signal.SIGKILL)
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    kind, name, message = events[-1]
    assert (kind, name) == ("failed", "segment") and "killed by signal 9" in message
    assert scene.GetNumberOfNodes() == before

    logic.segment(t1)
    assert logic.runner.wait(timeout=300) is RunState.IDLE
    assert events[-1] == ("finished", "segment")
    assert logic.engine()._client.process.pid != first_pid
