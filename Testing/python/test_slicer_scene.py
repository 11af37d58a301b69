"""DecipherMRLib's MRML core on Slicer's real scene (slicer-core): geometry, segments, heatmaps, queries.

Inputs are the real Colin27 T1 and AAL atlas, read by Slicer's own storage nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DecipherMR"))

from DecipherMRLib import (  # noqa: E402
    SegmentLabel,
    add_volume_from_array,
    array_from_volume_node,
    heat_color_table,
    ijk_to_ras,
    jump_slice_views,
    labels_from_rows,
    load_segmentation,
    same_geometry,
    save_segmentation,
    segment_array,
    set_foreground_opacity,
    show_as_foreground,
    sibling_parent,
    threshold_to_segment,
    volume_from_node,
    write_grounding,
    write_heatmap,
    write_segmentation,
)
from decipher_mr import assets  # noqa: E402
from slicer_scenes import scene_with_slice_views  # noqa: E402

make_scene = scene_with_slice_views


def read_volume_node(scene, path: Path, name: str, label: bool = False):
    node = slicer.vtkMRMLLabelMapVolumeNode() if label else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), path
    return node


def oblique_reference(scene, shape=(20, 22, 24)):
    """A volume with rotated, anisotropic voxels (what a tilted MRI acquisition looks like)."""
    rng = np.random.default_rng(0)
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    matrix = vtk.vtkMatrix4x4()
    linear = rotation @ tilt @ np.diag([0.9, 1.1, 3.0])
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, linear[r, c])
        matrix.SetElement(r, 3, (12.5, -30.0, 41.0)[r])
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("oblique")
    from DecipherMRLib.VolumeBridge import vtk_image_from_array

    node.SetAndObserveImageData(vtk_image_from_array(rng.random(shape).astype(np.float32)))
    node.SetIJKToRASMatrix(matrix)
    scene.AddNode(node)
    return node


@pytest.fixture(scope="module")
def colin_scene():
    scene = make_scene()
    t1 = read_volume_node(scene, assets.colin27_t1(), "Colin27")
    aal = read_volume_node(scene, assets.aal_atlas(), "AAL", label=True)
    return scene, t1, aal


def test_volume_node_has_the_geometry_and_voxels_the_engine_reads(colin_scene):
    from decipher_mr.data.io import read_volume

    _, t1, _ = colin_scene
    from_node = volume_from_node(t1)
    from_file = read_volume(assets.colin27_t1())
    assert from_node.shape == from_file.shape == (181, 217, 181)
    np.testing.assert_array_equal(from_node.array, from_file.array)
    np.testing.assert_allclose(from_node.affine_ras, from_file.affine_ras, atol=1e-4)
    np.testing.assert_allclose(ijk_to_ras(t1), from_file.affine_ras, atol=1e-4)


def test_array_round_trip_on_an_oblique_volume_keeps_voxels_and_geometry():
    scene = make_scene()
    ref = oblique_reference(scene)
    values = np.arange(np.prod((20, 22, 24)), dtype=np.float32).reshape(20, 22, 24)
    node = add_volume_from_array(scene, values, ref, "copy")
    assert same_geometry(node, ref)
    np.testing.assert_array_equal(array_from_volume_node(node), values)
    vol = volume_from_node(node)
    np.testing.assert_allclose(vol.affine_ras, ijk_to_ras(ref), atol=1e-9)
    # LPS differs from RAS only by the sign of the first two world axes.
    np.testing.assert_allclose(vol.affine_lps[:2], -ijk_to_ras(ref)[:2], atol=1e-9)


def test_an_output_on_another_grid_is_refused_with_the_volume_named(colin_scene):
    scene, t1, _ = colin_scene
    with pytest.raises(ValueError, match="Colin27"):
        write_heatmap(scene, t1, np.zeros((10, 10, 10), np.float32), "wrong grid")


def test_atlas_segmentation_has_named_coloured_segments_on_the_input_grid(colin_scene):
    scene, t1, aal = colin_scene
    names = assets.aal_region_names()
    atlas = array_from_volume_node(aal)
    chosen = [1, 2, 19, 20]  # precentral and frontal regions, left and right
    labels = np.where(np.isin(atlas, chosen), atlas, 0).astype(np.int16)
    rows = [{"value": v, "name": names[v], "color": f"#{(v * 40) % 256:02x}40c0"} for v in chosen]
    seg = write_segmentation(scene, t1, labels, labels_from_rows(rows), name="AAL regions")

    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        names[v] for v in chosen
    ]
    for i, value in enumerate(chosen):
        seg_id = segmentation.GetNthSegmentID(i)
        expected_color = ((value * 40) % 256 / 255.0, 0x40 / 255.0, 0xC0 / 255.0)
        np.testing.assert_allclose(segmentation.GetSegment(seg_id).GetColor(), expected_color, atol=1e-6)
        np.testing.assert_array_equal(segment_array(scene, seg, seg_id, t1), (atlas == value).astype(np.uint8))
    # The reference geometry is the input volume's, and the segmentation sits beside it.
    reference = segmentation.GetConversionParameter("Reference image geometry").split(";")
    np.testing.assert_allclose(np.array(reference[:16], float).reshape(4, 4), ijk_to_ras(t1), atol=1e-4)
    assert sibling_parent(scene, seg) == sibling_parent(scene, t1) != 0


def test_segmentation_on_an_oblique_volume_keeps_its_geometry_through_seg_nrrd(tmp_path):
    scene = make_scene()
    ref = oblique_reference(scene)
    labels = np.zeros((20, 22, 24), np.uint8)
    labels[2:9, 3:10, 4:12] = 1
    labels[11:17, 12:20, 1:6] = 2
    table = [SegmentLabel(1, "lesion", (1.0, 0.0, 0.0)), SegmentLabel(2, "oedema", (0.0, 0.5, 1.0)), SegmentLabel(3, "absent", (0.0, 1.0, 0.0))]
    seg = write_segmentation(scene, ref, labels, table)
    path = save_segmentation(seg, tmp_path / "oblique.seg.nrrd")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"

    reloaded = load_segmentation(scene, path)
    segmentation = reloaded.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(3)] == ["lesion", "oedema", "absent"]
    for i, lab in enumerate(table):
        seg_id = segmentation.GetNthSegmentID(i)
        np.testing.assert_allclose(segmentation.GetSegment(seg_id).GetColor(), lab.color, atol=1e-6)
        np.testing.assert_array_equal(segment_array(scene, reloaded, seg_id, ref), (labels == lab.value).astype(np.uint8))
        image = slicer.vtkOrientedImageData()
        from DecipherMRLib.SegmentationWriter import segmentation_logic

        segmentation_logic(scene).GetSegmentBinaryLabelmapRepresentation(reloaded, seg_id, image)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(world, ijk_to_ras(ref), atol=1e-6)


def test_anomaly_heatmap_is_the_foreground_with_heat_colours_and_opacity(colin_scene):
    scene, t1, _ = colin_scene
    t1_array = array_from_volume_node(t1).astype(np.float32)
    scores = t1_array / t1_array.max()
    heat = write_heatmap(scene, t1, scores, "Colin27 anomaly", lower_threshold=0.2)
    assert same_geometry(heat, t1)
    np.testing.assert_allclose(array_from_volume_node(heat), scores)
    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == heat_color_table(scene).GetID()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.2)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.2, 1.0))
    table = heat_color_table(scene)
    assert table.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    table.GetColor(0, rgba)
    assert rgba[3] == 0.0  # the lowest scores let the anatomy through
    assert sibling_parent(scene, heat) == sibling_parent(scene, t1)

    show_as_foreground(scene, heat, t1, opacity=0.4)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    assert {c.GetForegroundVolumeID() for c in composites} == {heat.GetID()}
    assert {c.GetBackgroundVolumeID() for c in composites} == {t1.GetID()}
    set_foreground_opacity(scene, 0.75)
    assert {c.GetForegroundOpacity() for c in composites} == {0.75}

    seg, segment_id = threshold_to_segment(scene, heat, t1, 0.6, "anomaly ≥ 0.6")
    assert seg.GetSegmentation().GetSegment(segment_id).GetName() == "anomaly ≥ 0.6"
    np.testing.assert_array_equal(segment_array(scene, seg, segment_id, t1), (scores >= 0.6).astype(np.uint8))


def test_text_query_adds_a_named_segment_a_peak_markup_and_jumps_the_views(colin_scene):
    scene, t1, aal = colin_scene
    atlas = array_from_volume_node(aal)
    region = atlas == 3  # Frontal_Sup_L
    centre = np.argwhere(region).mean(axis=0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in atlas.shape], indexing="ij"), axis=-1)
    scores = np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 6.0**2)).astype(np.float32)

    first = write_grounding(scene, t1, scores, "lesion in the left   superior frontal gyrus")
    name = first.segmentation_node.GetSegmentation().GetSegment(first.segment_id).GetName()
    assert name == "lesion in the left superior frontal gyrus"
    peak = np.unravel_index(np.argmax(scores), scores.shape)
    assert first.peak_ijk == tuple(int(v) for v in peak)
    expected_ras = (ijk_to_ras(t1) @ np.array([*peak, 1.0]))[:3]
    position = [0.0, 0.0, 0.0]
    first.markup_node.GetNthControlPointPosition(0, position)
    np.testing.assert_allclose(position, expected_ras, atol=1e-6)
    assert atlas[first.peak_ijk] == 3  # the peak lies inside the region the query names
    mask = segment_array(scene, first.segmentation_node, first.segment_id, t1)
    assert mask[first.peak_ijk] == 1 and mask.sum() > 0

    # Every slice view now passes through the peak.
    for i in range(3):
        view = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        slice_to_ras = view.GetSliceToRAS()
        normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
        origin = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
        assert abs(np.dot(expected_ras - origin, normal)) < 1e-3, view.GetLayoutName()

    second = write_grounding(scene, t1, scores[::-1].copy(), "right side", segmentation_node=first.segmentation_node)
    assert second.segmentation_node is first.segmentation_node
    assert first.segmentation_node.GetSegmentation().GetNumberOfSegments() == 2


def test_jump_reaches_an_arbitrary_point_in_every_view():
    scene = make_scene()
    jump_slice_views(scene, (10.0, -20.0, 35.0))
    offsets = []
    for i in range(3):
        m = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetSliceToRAS()
        offsets.append([m.GetElement(r, 3) for r in range(3)])
    assert offsets[0][2] == pytest.approx(35.0) and offsets[1][1] == pytest.approx(-20.0) and offsets[2][0] == pytest.approx(10.0)


def test_load_volume_file_matches_slicers_own_reader_and_reads_dicom_folders(tmp_path):
    """The viewer's loader (decipher_mr's checked reader -> node) gives Slicer's geometry and voxels."""
    from DecipherMRLib import load_volume_file
    from slicer_scenes import add_colin27

    from decipher_mr.data.io import read_volume, write_dicom_series

    scene = slicer.vtkMRMLScene()
    by_slicer = add_colin27(scene)
    ours = load_volume_file(scene, assets.colin27_t1())
    assert ours.GetName() == "ch2"
    assert same_geometry(ours, by_slicer)
    np.testing.assert_array_equal(array_from_volume_node(ours), array_from_volume_node(by_slicer))

    # A DICOM series folder, oblique-free but LPS-stored: the same RAS geometry comes back.
    volume = read_volume(assets.colin27_t1())
    volume.array = volume.array[40:120, 50:150, 60:100].astype(np.int16)
    folder = write_dicom_series(volume, tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.2.1125.42", description="T1")
    node = load_volume_file(scene, folder, name="from-dicom")
    assert tuple(node.GetImageData().GetDimensions()) == (80, 100, 40)
    np.testing.assert_allclose(ijk_to_ras(node)[:3, :3], ijk_to_ras(by_slicer)[:3, :3], atol=1e-4)

    # Bad input: the file is named, and nothing is added to the scene.
    before = scene.GetNumberOfNodes()
    flat = tmp_path / "flat.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8), np.float32)), str(flat))
    with pytest.raises(Exception, match="flat.nii.gz"):
        load_volume_file(scene, flat)
    assert scene.GetNumberOfNodes() == before
