"""Maps on the model's own grid, shown in the scene through their own IJK->RAS, land where the old maps
resampled onto the input's grid did: on the real Colin27 T1 (181x217x181, 1 mm) with a 2 mm bundle.

The same ``Session.ground`` / ``anomaly_map`` / ``segment`` result goes into two scenes: once as the
input-grid maps (the previous path) and once as the grid maps (what the panel now shows). The markup
(the peak) agrees within a voxel, the views jump to the same place, the segment covers the same voxels
once exported onto the input grid (up to the half model voxel a 2 mm grid moves a boundary), and a saved
``.seg.nrrd`` and ``segment_array`` are still on the input's grid.
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
sys.path.insert(0, str(ROOT / "Testing" / "bench"))

from DecipherMRLib import array_from_volume_node, ijk_to_ras, load_segmentation, save_segmentation, segment_array  # noqa: E402
from DecipherMRLib.EngineResults import apply_anomaly, apply_grounding, apply_segmentation  # noqa: E402
from DecipherMRLib.VolumeBridge import volume_from_node  # noqa: E402
from slicer_scenes import add_colin27, scene_with_slice_views  # noqa: E402


def _input_grid(result) -> dict:
    """The result as the previous engine answered: maps on the input's grid only."""
    if hasattr(result, "label_names"):
        return {"labels": result.labels, "label_names": result.label_names}
    return {"heatmap": result.heatmap, "mask": result.mask, "peak_ijk": result.peak_ijk,
            "threshold": result.threshold, "query": result.query}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from bench_inference import make_bundle

    from decipher_mr.inference import Session

    bundle = make_bundle(tmp_path_factory.mktemp("grid_native") / "bundle", "vit-micro", (2.0, 2.0, 2.0))
    session = Session.from_bundle(bundle, device="cpu")
    scene = scene_with_slice_views()
    t1 = add_colin27(scene)
    volume = volume_from_node(t1)
    return session, volume


def _scenes():
    out = []
    for _ in range(2):
        scene = scene_with_slice_views()
        out.append((scene, add_colin27(scene)))
    return out


def _peak_ras(markup) -> np.ndarray:
    position = [0.0, 0.0, 0.0]
    markup.GetNthControlPointPosition(0, position)
    return np.array(position)


def _slice_origins(scene) -> np.ndarray:
    out = []
    for i in range(3):
        m = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetSliceToRAS()
        out.append([m.GetElement(r, 3) for r in range(3)])
    return np.array(out)


def test_grounding_on_the_model_grid_lands_where_the_resampled_map_did(engine, tmp_path):
    session, volume = engine
    result = session.ground(volume, "lesion in the left frontal lobe")
    assert result.grid_heatmap.shape != volume.shape  # the map really is on the model's 2 mm grid
    (old_scene, old_t1), (new_scene, new_t1) = _scenes()
    old = apply_grounding(old_scene, old_t1, _input_grid(result))
    new = apply_grounding(new_scene, new_t1, result)

    # the markup at the peak, and every slice view through it, within one input voxel (1 mm)
    np.testing.assert_allclose(_peak_ras(new.markup_node), _peak_ras(old.markup_node), atol=1.0 + 1e-6)
    np.testing.assert_allclose(_slice_origins(new_scene), _slice_origins(old_scene), atol=1.0 + 1e-6)
    assert max(abs(a - b) for a, b in zip(new.peak_ijk, old.peak_ijk)) <= 1

    # the segment: exported onto the input grid it covers the same voxels (a 2 mm grid moves the
    # boundary by at most half a model voxel), and it holds the peak
    old_mask = segment_array(old_scene, old.segmentation_node, old.segment_id, old_t1)
    new_mask = segment_array(new_scene, new.segmentation_node, new.segment_id, new_t1)
    assert new_mask.shape == old_mask.shape == volume.shape
    dice = 2 * np.sum(old_mask & new_mask) / max(1, old_mask.sum() + new_mask.sum())
    assert dice > 0.9, dice
    assert new_mask[new.peak_ijk] == 1

    # a saved segmentation is on the input's grid
    saved = save_segmentation(new.segmentation_node, tmp_path / "query.seg.nrrd")
    reread = load_segmentation(new_scene, saved)
    from decipher_mr.data.io import read_volume

    on_disk = read_volume(saved, allow_constant=True)
    # on the input's voxel lattice (same spacing and directions, origin a whole number of voxels away);
    # the model grid reaching a voxel past the input's edge can widen the saved extent by that voxel
    affine, ref = on_disk.affine_ras, ijk_to_ras(new_t1)
    np.testing.assert_allclose(affine[:3, :3], ref[:3, :3], atol=1e-4)
    offset = np.linalg.solve(ref, affine[:, 3])[:3]
    np.testing.assert_allclose(offset, np.rint(offset), atol=1e-3)
    assert np.all(offset <= 0) and np.all(np.asarray(on_disk.shape[:3]) + offset >= volume.shape)
    assert reread.GetSegmentation().GetNumberOfSegments() == 1


def test_anomaly_and_segmentation_on_the_model_grid_show_the_same_values_in_place(engine):
    session, volume = engine
    (old_scene, old_t1), (new_scene, new_t1) = _scenes()

    seg = session.segment(volume)
    old_seg = apply_segmentation(old_scene, old_t1, _input_grid(seg))
    new_seg = apply_segmentation(new_scene, new_t1, seg)
    for i in range(old_seg.GetSegmentation().GetNumberOfSegments()):
        a = segment_array(old_scene, old_seg, old_seg.GetSegmentation().GetNthSegmentID(i), old_t1)
        b = segment_array(new_scene, new_seg, new_seg.GetSegmentation().GetNthSegmentID(i), new_t1)
        # nearest-neighbour labels: the same voxels whichever grid they were imported on, except where an
        # input voxel centre falls exactly on a model voxel boundary (ITK and VTK break that tie apart;
        # random weights make boundaries everywhere, so this bound is loose for a trained head)
        assert np.mean(a != b) < 0.02, (i, np.mean(a != b))

    amap = session.ground(volume, "enhancing mass")  # a heatmap result (the bench bundle has no anomaly head)
    old_heat = apply_anomaly(old_scene, old_t1, _input_grid(amap))
    new_heat = apply_anomaly(new_scene, new_t1, amap)
    grid = array_from_volume_node(new_heat)
    assert grid.shape == amap.grid_heatmap.shape
    # sample both heat nodes at the model-grid voxel centres: the same value at the same RAS point
    ijk = np.argwhere(np.ones(grid.shape, bool))[::997]
    ras = (ijk_to_ras(new_heat) @ np.c_[ijk, np.ones(len(ijk))].T).T
    old_ijk = np.rint(np.linalg.solve(ijk_to_ras(old_heat), ras.T).T[:, :3]).astype(int)
    inside = np.all((old_ijk >= 0) & (old_ijk < volume.shape), axis=1)
    old_values = array_from_volume_node(old_heat)[tuple(old_ijk[inside].T)]
    np.testing.assert_allclose(grid[tuple(ijk[inside].T)], old_values, atol=1e-4)
    composite = new_scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == new_heat.GetID()
