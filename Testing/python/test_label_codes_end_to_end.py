"""A label's coded concept travels from the bundle's label table to Slicer's segment terminology.

A tiny real bundle (``outputs_helpers.tiny_bundle``'s model and heads) whose segmentation head's
``labels.csv`` carries a CUSTOM code (one no name lookup would give), a code-less row (an old table:
its name's default) and a known name; Colin27 is segmented by the real worker process through
``ModuleLogic`` + ``WorkerEngine`` (the path of the Slicer module and the browser viewer) into a
slicer-core scene, and each segment's ``TerminologyEntry`` is read back with Slicer's terminology logic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("decipher_mr.inference.client")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DecipherMR"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from outputs_helpers import LOBES, tiny_bundle  # noqa: E402

from decipher_mr.bundle.codes import default_codes, label_codes, slicer_terminology_entry  # noqa: E402

# Not what any name gives: "frontal lobe" by name is SCT 83251001 under Anatomical Structure.
CUSTOM_CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
CUSTOM_TYPE = ("SCT", "86049000", "Malignant neoplasm, primary")
CUSTOM = {1: (CUSTOM_CATEGORY, CUSTOM_TYPE)}  # label 1 ("frontal lobe") carries the custom code
UNCODED = {2}  # label 2 ("temporal lobe") has empty code cells: its name's default


def custom_codes(rows: list[dict]) -> list[dict]:
    """The label table with label 1's custom code and label 2's code cells left empty."""
    for row in rows:
        index = int(row["index"])
        if index in CUSTOM:
            row["category"], row["type"] = ("^".join(c) for c in CUSTOM[index])
        elif index in UNCODED:
            row["category"], row["type"] = "", ""
    return rows


def coded_bundle(folder: Path) -> Path:
    """``tiny_bundle`` written with a label table holding a custom code."""
    return tiny_bundle(folder, name="tiny-label-codes-test", relabel=custom_codes)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return coded_bundle(tmp_path_factory.mktemp("label_codes_bundle"))


def expected_entries(bundle: Path) -> dict[str, str]:
    """Segment name -> the TerminologyEntry its label table row should give."""
    table = (bundle / "heads" / "lobes" / "labels.csv").read_text(encoding="utf-8")
    assert "SCT^86049000^Malignant neoplasm, primary" in table  # the custom code is in the bundle's file
    return {name: slicer_terminology_entry(*(CUSTOM.get(i) or default_codes(name)))
            for i, name in enumerate(LOBES) if i > 0}


def test_the_worker_sends_the_label_table_codes(bundle):
    from decipher_mr.assets import colin27_t1
    from decipher_mr.bundle import load_bundle
    from decipher_mr.inference.client import WorkerClient

    with WorkerClient(bundle, device="cpu").start() as client:
        answer = client.request("segment", {"volume": str(colin27_t1())}, timeout=300)
    codes = {c["value"]: c for c in answer["label_codes"]}
    assert sorted(codes) == [1, 2, 3, 4]  # no background
    assert codes[1]["category"] == "^".join(CUSTOM_CATEGORY) and codes[1]["type"] == "^".join(CUSTOM_TYPE)
    assert codes[1]["coded"] is True and codes[2]["coded"] is False
    assert codes[2]["type"] == "^".join(default_codes("temporal lobe")[1])
    assert [codes[c.index]["type"] for c in label_codes(load_bundle(bundle).labels["lobes"])] == [
        codes[v]["type"] for v in (1, 2, 3, 4)]
    assert answer["labels"] == LOBES


def test_a_custom_code_reaches_the_slicer_segment_through_the_worker(bundle):
    from slicer_scenes import add_colin27

    from DecipherMRLib.Engine import WorkerEngine
    from DecipherMRLib.ModuleLogic import ModuleLogic
    from DecipherMRLib.Runner import RunState

    scene = slicer.vtkMRMLScene()
    t1 = add_colin27(scene)
    logic = ModuleLogic(scene, engine_factory=WorkerEngine)
    logic.configure(str(bundle), device="cpu")
    failures = []
    logic.runner.failed.connect(lambda name, message, details: failures.append((name, message)))
    try:
        logic.segment(t1)
        assert logic.runner.wait(timeout=300) is RunState.IDLE
        assert not failures, failures
    finally:
        logic.shutdown()
    node = scene.GetNodesByClass("vtkMRMLSegmentationNode").GetItemAsObject(0)
    seg = node.GetSegmentation()
    tags = {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetTerminology()  # the TerminologyEntry tag
            for i in range(seg.GetNumberOfSegments())}
    assert tags == expected_entries(bundle)
    # Slicer's own terminology logic reads the custom code back.
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tags["frontal lobe"], entry)
    assert entry.GetTypeObject().GetCodeValue() == "86049000"
    assert entry.GetTypeObject().GetCodeMeaning() == "Malignant neoplasm, primary"
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    assert tags["frontal lobe"] != slicer_terminology_entry(*default_codes("frontal lobe"))  # not the name's code


def test_a_result_without_codes_still_names_terminology_by_label(bundle):
    """An older worker (no ``label_codes``): the segments get their names' codes, as before."""
    import numpy as np

    from slicer_scenes import add_colin27

    from DecipherMRLib.EngineResults import apply_segmentation
    from DecipherMRLib.VolumeBridge import array_from_volume_node

    scene = slicer.vtkMRMLScene()
    t1 = add_colin27(scene)
    labels = np.zeros(array_from_volume_node(t1).shape, np.uint8)
    labels[40:60, 40:60, 40:60] = 1
    for codes in (None, [{"value": 1, "category": "bad", "type": "SCT^1^x"}]):  # absent, or unusable
        node = apply_segmentation(scene, t1, {"labels": labels, "label_names": LOBES[:2], "label_codes": codes})
        segment = node.GetSegmentation().GetNthSegment(0)
        assert segment.GetTerminology() == slicer_terminology_entry(*default_codes("frontal lobe"))
