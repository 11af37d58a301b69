"""DICOM-SEG with coded labels: written with highdicom, read back with pydicom and highdicom, equal to the
NIfTI output voxel for voxel and in geometry, on Colin27 written as a real DICOM series (SimpleITK)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from outputs_helpers import LOBES, colin_small, tiny_bundle, write_scanner_series

from decipher_mr.bundle import load_bundle
from decipher_mr.bundle.codes import (DEFAULT_CODES, CodeError, default_codes, label_codes,
                                      parse_slicer_terminology_entry, slicer_terminology_entry)
from decipher_mr.cli import main
from decipher_mr.data.io import read_volume
from decipher_mr.data.volume import Volume

SERIES = "1.2.826.0.1.3680043.2.1125.5150"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("seg_bundle"))


@pytest.fixture(scope="module", params=[False, True], ids=["axial", "oblique"])
def series(request, tmp_path_factory) -> Path:
    return write_scanner_series(colin_small(3, oblique=request.param), tmp_path_factory.mktemp("dcm") / "T1", SERIES)


def seg_to_label_map(path: Path, like: Volume) -> np.ndarray:
    """Rebuild an [i, j, k] label map on ``like``'s grid from the SEG's frames with pydicom alone: each
    frame's segment number and plane position; fails unless every frame lies exactly on a slice."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    assert np.allclose(iop[:3], like.direction[:, 0], atol=1e-5) and np.allclose(iop[3:], like.direction[:, 1], atol=1e-5)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    assert np.isclose(row_mm, like.spacing[1]) and np.isclose(col_mm, like.spacing[0])
    assert np.isclose(float(shared.PixelMeasuresSequence[0].SpacingBetweenSlices), like.spacing[2], atol=1e-4)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    inv = np.linalg.inv(like.affine_lps)
    out = np.zeros(like.shape, np.int32)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ijk = inv @ np.append(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 1.0)
        assert np.allclose(ijk[:3], np.round(ijk[:3]), atol=1e-3) and np.allclose(ijk[:2], 0, atol=1e-3)
        k = int(round(ijk[2]))
        out[:, :, k][frame.T > 0] = number
    return out


def test_seg_matches_the_nifti_output_voxel_for_voxel_and_references_the_source(bundle, series, tmp_path):
    out = tmp_path / "out"
    assert main(["infer", "--bundle", str(bundle), "--volume", str(series), "--tasks", "segment", "--dicom-seg",
                 "--no-previews", "--out", str(out)]) == 0
    nifti = read_volume(out / "segmentation.nii.gz")
    assert nifti.same_geometry(read_volume(series))
    assert len(np.unique(nifti.array)) > 2  # a real multi-label map to compare
    seg_path = out / "segmentation.dcm"
    assert np.array_equal(seg_to_label_map(seg_path, nifti), nifti.array)  # segment n = label n here

    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == "COLIN27"
    referenced = {r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES
    assert referenced == {s.SOPInstanceUID for s in sources}
    derivations = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                   for f in ds.PerFrameFunctionalGroupsSequence}
    assert derivations == referenced  # each frame names the source image it lies on


def test_segments_carry_the_bundle_codes_and_highdicom_reads_the_same_volume(bundle, series, tmp_path):
    import highdicom as hd

    out = tmp_path / "out"
    main(["infer", "--bundle", str(bundle), "--volume", str(series), "--tasks", "segment", "--dicom-seg",
          "--no-previews", "--out", str(out)])
    seg = hd.seg.segread(out / "segmentation.dcm")
    descs = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    assert [descs[n].SegmentLabel for n in sorted(descs)] == LOBES[1:]
    frontal = descs[1]
    assert (frontal.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            frontal.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == ("83251001", "SCT")
    assert frontal.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert descs[4].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # unknown name: Tissue
    assert frontal.SegmentAlgorithmType == "AUTOMATIC"

    nifti = read_volume(out / "segmentation.nii.gz")
    vol = seg.get_volume(combine_segments=True)
    # highdicom's volume axes are (slice, row, column); map them onto ours through the two affines
    m = np.linalg.inv(nifti.affine_lps) @ vol.affine
    perm = np.abs(np.round(m[:3, :3])).astype(int)
    assert np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-4) and (perm.sum(0) == 1).all()
    arr = np.transpose(vol.array, [int(np.argmax(perm[a])) for a in range(3)])
    for axis in range(3):
        if m[axis, int(np.argmax(perm[axis]))] < 0:
            arr = np.flip(arr, axis)
    assert arr.shape == nifti.shape and np.array_equal(arr, nifti.array)


def test_a_nifti_input_gets_a_seg_on_a_written_reference_series(bundle, tmp_path):
    from decipher_mr.data.volume import write_volume

    src = write_volume(colin_small(4, oblique=True), tmp_path / "colin.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", "--bundle", str(bundle), "--volume", str(src), "--tasks", "segment", "--dicom-seg",
                 "--no-previews", "--out", str(out)]) == 0
    nifti = read_volume(out / "segmentation.nii.gz")
    ref = out / "segmentation-source-dicom"
    assert read_volume(ref).same_geometry(nifti)
    assert np.array_equal(seg_to_label_map(out / "segmentation.dcm", nifti), nifti.array)


def test_an_old_bundle_without_codes_loads_and_exports_default_codes(tmp_path):
    old = tiny_bundle(tmp_path, coded=False)
    assert (old / "heads" / "lobes" / "labels.csv").read_text(encoding="utf-8").splitlines()[0] == "index,name"
    rows = load_bundle(old).labels["lobes"]
    codes = label_codes(rows)
    assert [c.type[1] for c in codes] == ["83251001", "78277001", "113305005", "85756007"]
    assert not any(c.coded for c in codes)


def test_codes_parse_and_round_trip_as_slicer_terminology():
    assert default_codes("Frontal_Lobe_L")[1][1] == "83251001"
    assert default_codes("right temporal lobe")[1][1] == "78277001"
    assert default_codes("whatever") == DEFAULT_CODES
    entry = slicer_terminology_entry(*default_codes("cerebellum"))
    # vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry: 7 '~' fields, codes as scheme^value^meaning
    assert entry.split("~")[1:3] == ["SCT^123037004^Anatomical Structure", "SCT^113305005^Cerebellum"]
    assert len(entry.split("~")) == 7
    assert parse_slicer_terminology_entry(entry) == default_codes("cerebellum")
    with pytest.raises(CodeError, match="row 1"):
        label_codes([{"index": 0, "name": "background"}, {"index": 1, "name": "x", "category": "SCT^1", "type": ""}])


def test_a_bundle_with_a_malformed_code_is_refused_clearly(tmp_path):
    from decipher_mr.bundle import BundleError

    b = tiny_bundle(tmp_path)
    labels = b / "heads" / "lobes" / "labels.csv"
    text = labels.read_text(encoding="utf-8").replace("SCT^83251001^Frontal lobe", "SCT^83251001")
    labels.write_text(text)
    manifest = (b / "manifest.json")
    import hashlib
    import json

    m = json.loads(manifest.read_text(encoding="utf-8"))
    m["files"]["heads/lobes/labels.csv"]["sha256"] = hashlib.sha256(labels.read_bytes()).hexdigest()
    m["files"]["heads/lobes/labels.csv"]["bytes"] = labels.stat().st_size
    manifest.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="scheme\\^value\\^meaning"):
        load_bundle(b)


def test_slicer_segments_carry_the_same_codes_as_terminology(bundle):
    """The Slicer module names segments with the bundle's codes, in the format Slicer's own terminology
    logic (slicer-core's vtkSlicerTerminologiesModuleLogic) reads and writes back unchanged."""
    import sys

    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DecipherMR"))
    from DecipherMRLib.SegmentationWriter import labels_from_rows, terminology_entry, write_segmentation

    rows = load_bundle(bundle).labels["lobes"]
    scene = slicer.vtkMRMLScene()
    ref = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(ref)
    from DecipherMRLib.VolumeBridge import vtk_image_from_array

    labels = np.zeros((8, 9, 10), np.int16)
    labels[1:4, 2:5, 3:6], labels[5:7, 5:8, 5:9] = 1, 3
    ref.SetAndObserveImageData(vtk_image_from_array(labels.astype(np.float32)))
    table = labels_from_rows(rows)
    assert [t.name for t in table] == LOBES[1:]  # no background segment
    node = write_segmentation(scene, ref, labels, table)
    seg = node.GetSegmentation()
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for n, row in enumerate(rows[1:]):
        segment = seg.GetSegment(seg.GetNthSegmentID(n))
        tag = segment.GetTerminology()  # vtkSegment: the "TerminologyEntry" tag
        code = label_codes([row])[0]
        assert tag == slicer_terminology_entry(code.category, code.type)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tag, entry)
        assert entry.GetTypeObject().GetCodeValue() == code.type[1]
        assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"
        assert logic.SerializeTerminologyEntry(entry) == tag
    assert terminology_entry("SCT^85756007^Tissue", "SCT^85756007^Tissue") == slicer_terminology_entry(*DEFAULT_CODES)
    # a segment named by the engine without a table (text query, names-only results) gets the same codes
    from DecipherMRLib.SegmentationWriter import SegmentLabel, default_terminology

    named = write_segmentation(scene, ref, labels, [SegmentLabel(1, "left frontal lobe", (1.0, 0.0, 0.0)),
                                                    SegmentLabel(3, "some finding", (0.0, 1.0, 0.0))])
    seg = named.GetSegmentation()
    assert seg.GetSegment(seg.GetNthSegmentID(0)).GetTerminology() == slicer_terminology_entry(*default_codes("frontal lobe"))
    assert seg.GetSegment(seg.GetNthSegmentID(1)).GetTerminology() == slicer_terminology_entry(*DEFAULT_CODES)
    assert default_terminology("cerebellum") == slicer_terminology_entry(*default_codes("cerebellum"))
