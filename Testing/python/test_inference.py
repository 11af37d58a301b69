"""The inference engine on a real bundle and real MRI: geometry, caching, windows, refusals, the infer CLI.

The bundle (tiny aligned model, heads trained a few steps by the real training loop) comes from
``bundle_factory``; inputs are the real Colin27 T1 (downsampled to 2 mm to keep tests fast) in
several geometries: as read (LPS on disk), flipped to RAS, anisotropic, and oblique.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import shared_test_bundle
from decipher_mr.data.io import VolumeReadError, read_volume
from decipher_mr.data.volume import Volume, write_volume
from decipher_mr.inference import InferenceError, QueryError, Session
from decipher_mr.inference.encoding import axis_tiles

QUERY = "lesion in the left frontal lobe"


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    return shared_test_bundle(prepared_demo_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def session(bundle) -> Session:
    return Session.from_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def colin() -> Volume:
    """Real Colin27 T1 at 2 mm (every second voxel), the central 120x140x120 mm, geometry as on disk."""
    from decipher_mr.assets import colin27_t1

    vol = read_volume(colin27_t1())
    start = np.array([30, 38, 30])
    origin = (vol.affine_lps @ np.append(start, 1.0))[:3]
    arr = vol.array[30:150:2, 38:178:2, 30:150:2]
    return Volume(np.ascontiguousarray(arr).astype(np.float32), tuple(2 * s for s in vol.spacing), tuple(origin),
                  vol.direction.copy())


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.radians(z_deg), np.radians(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def flipped_copy(vol: Volume, axes=(0, 1)) -> Volume:
    """The same image in the same place, stored with ``axes`` reversed (LPS <-> RAS storage)."""
    arr = np.ascontiguousarray(np.flip(vol.array, axes))
    direction = vol.direction.copy()
    corner = np.zeros(3)
    for a in axes:
        direction[:, a] *= -1
        corner[a] = vol.shape[a] - 1
    origin = (vol.affine_lps @ np.append(corner, 1.0))[:3]
    return Volume(arr, vol.spacing, tuple(origin), direction)


def assert_in_geometry(out: Volume, vol: Volume) -> None:
    assert out.shape == vol.shape
    assert np.allclose(out.spacing, vol.spacing)
    assert np.allclose(out.origin, vol.origin, atol=1e-4)
    assert np.allclose(out.direction, vol.direction, atol=1e-6)


# -- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["as_read", "anisotropic", "oblique"])
def test_every_output_comes_back_in_the_input_geometry(session, colin, kind):
    vol = colin
    if kind == "anisotropic":
        vol = Volume(np.ascontiguousarray(colin.array[:, :, ::3]), (2.0, 2.0, 6.0), colin.origin, colin.direction)
    elif kind == "oblique":
        vol = Volume(colin.array, (2.0, 2.5, 2.0), colin.origin, rotation(25, 10) @ colin.direction)
    seg = session.segment(vol)
    amap = session.anomaly_map(vol)
    hit = session.ground(vol, QUERY)
    loc = session.localize(vol, keep_heatmaps=kind == "as_read")  # six more restores: once is enough
    assert set(loc.structures) == set(session.bundle.heads["lobe-boxes"].config.labels)
    for out in (seg.labels, amap.heatmap, amap.mask, hit.heatmap, hit.mask, *loc.heatmaps.values()):
        assert_in_geometry(out, vol)
    assert seg.labels.array.dtype == np.uint8 and seg.labels.array.max() < len(seg.label_names)
    assert 0.0 <= amap.heatmap.array.min() and amap.heatmap.array.max() <= 1.0
    i0, j0, k0, i1, j1, k1 = hit.box_ijk
    assert 0 <= i0 < i1 <= vol.shape[0] and 0 <= j0 < j1 <= vol.shape[1] and 0 <= k0 < k1 <= vol.shape[2]
    assert np.allclose(hit.peak_lps, (vol.affine_lps @ np.append(hit.peak_ijk, 1))[:3])


def test_ras_stored_copy_gives_the_same_answers_in_world_space(session, colin):
    ras = flipped_copy(colin, axes=(0, 1))
    a, b = session.ground(colin, QUERY), session.ground(ras, QUERY)
    assert np.allclose(np.flip(b.heatmap.array, (0, 1)), a.heatmap.array, atol=1e-5)
    assert np.allclose(b.peak_lps, a.peak_lps) or np.isclose(b.heatmap.array.max(), a.heatmap.array.max())
    # labels on the bundle's own 3 mm grid: no resampling, so nearest-neighbour ties cannot differ
    native = Volume(colin.array, (3.0, 3.0, 3.0), colin.origin, colin.direction)
    sa, sb = session.segment(native), session.segment(flipped_copy(native, axes=(0, 1)))
    assert np.array_equal(np.flip(sb.labels.array, (0, 1)), sa.labels.array)
    assert np.allclose(a.box_lps, b.box_lps)


# -- caching ----------------------------------------------------------------------------------


def test_a_second_query_on_the_same_volume_does_not_re_encode(bundle, colin):
    s = Session.from_bundle(bundle, device="cpu")
    s.ground(colin, QUERY)
    assert s.stats["encoder_passes"] == 1
    s.ground(colin, "right occipital lobe")
    s.segment(colin)
    s.anomaly_map(colin)
    s.localize(colin)
    s.retrieve_reports(colin, reports=["FINDINGS: normal. IMPRESSION: normal brain.", "IMPRESSION: lesion."])
    assert s.stats["encoder_passes"] == 1
    assert s.stats["encode_cache_hits"] == 5


def test_same_voxels_from_a_file_and_from_memory_share_one_encoding(bundle, colin, tmp_path):
    s = Session.from_bundle(bundle, device="cpu")
    path = write_volume(colin, tmp_path / "colin.nii.gz")
    s.encode(path)
    s.encode(read_volume(path))
    assert s.stats["encoder_passes"] == 1
    changed = colin.with_array(colin.array + 1.0)
    s.encode(changed)
    assert s.stats["encoder_passes"] == 2


def test_text_embeddings_are_cached_by_query(bundle, colin):
    s = Session.from_bundle(bundle, device="cpu")
    first = s.ground(colin, QUERY)
    second = s.ground(colin, "  lesion in the   left frontal lobe ")
    assert s.stats["text_passes"] == 1 and s.stats["text_cache_hits"] == 1
    assert np.array_equal(first.heatmap.array, second.heatmap.array)


# -- large volumes ----------------------------------------------------------------------------


def test_axis_tiles_partition_the_axis_with_full_windows():
    for n, w, h in [(10, 6, 1), (40, 16, 2), (17, 16, 2), (5, 6, 1), (100, 8, 2)]:
        tiles = axis_tiles(n, w, h)
        assert [t[0] for t in tiles][0] == 0 and tiles[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))  # cores partition [0, n)
        for a, b, lo, hi in tiles:
            assert lo <= a < b <= hi and 0 <= lo and hi <= n and hi - lo == min(w, n)


def test_a_large_volume_is_encoded_in_windows_with_outputs_in_its_geometry(bundle, colin):
    windowed = Session.from_bundle(bundle, device="cpu", max_tokens=100)
    whole = Session.from_bundle(bundle, device="cpu")
    enc_w, enc_1 = windowed.encode(colin), whole.encode(colin)
    assert enc_w.windows > 1 and enc_1.windows == 1
    assert enc_w.grid == enc_1.grid and enc_w.patch_tokens.shape == enc_1.patch_tokens.shape
    assert all(v.shape == enc_w.patch_tokens.shape for v in enc_w.layers.values())
    assert np.isfinite(enc_w.patch_tokens.numpy()).all()
    assert_in_geometry(windowed.segment(colin).labels, colin)
    assert_in_geometry(windowed.ground(colin, QUERY).heatmap, colin)


def test_segmentation_decodes_in_windows_beyond_a_few_training_views(bundle, colin):
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.bundle import load_bundle
    from decipher_mr.inference.decoding import SINGLE_PASS_VIEWS, WINDOW_VIEWS

    b = load_bundle(bundle)
    b.preprocess = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0))  # a finer grid than the head's view
    s = Session(b, device="cpu")
    enc = s.encode(colin)
    view = np.prod([c // 8 for c in b.heads["lobes"].config.crop])
    assert np.prod(enc.grid) > SINGLE_PASS_VIEWS * view
    assert any(g > WINDOW_VIEWS * c // 8 for g, c in zip(enc.grid, b.heads["lobes"].config.crop))  # several windows
    seg = s.segment(colin)
    assert_in_geometry(seg.labels, colin)
    assert len(np.unique(seg.labels.array)) >= 1


# -- refusals ---------------------------------------------------------------------------------


def test_a_2d_volume_is_refused_clearly(session, colin):
    flat = Volume(np.ascontiguousarray(colin.array[:, :, 40:41]), colin.spacing, colin.origin, colin.direction)
    with pytest.raises(InferenceError, match="2D image"):
        session.segment(flat)


@pytest.mark.parametrize("query", ["", "   ", "x" * 1001])
def test_empty_and_over_long_queries_are_refused(session, colin, query):
    with pytest.raises(QueryError, match="empty|too long"):
        session.ground(colin, query)


def test_a_query_over_the_token_limit_is_refused(session, colin):
    with pytest.raises(QueryError, match="tokens"):
        session.ground(colin, "\u8111" * 600)  # CJK characters are one token each: 600 tokens in 600 characters


def test_a_missing_volume_path_names_the_file(session, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeReadError, match="nope.nii.gz.*does not exist"):
        session.ground(missing, QUERY)


def test_a_head_the_bundle_lacks_is_named(session, colin):
    with pytest.raises(InferenceError, match="no segment head named 'tissue'"):
        session.segment(colin, head="tissue")


# -- command line -----------------------------------------------------------------------------


def test_infer_cli_writes_outputs_summary_and_previews(bundle, colin, tmp_path):
    from decipher_mr.cli import main

    src = write_volume(colin, tmp_path / "colin.nrrd")
    out = tmp_path / "out"
    rc = main(["infer", "--bundle", str(bundle), "--volume", str(src), "--tasks", "segment,anomaly,localize",
               "--query", QUERY, "--out", str(out), "--format", "nrrd"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["outputs"]) == {"segmentation", "anomaly", "localization", "ground-lesion-in-the-left-frontal-lobe"}
    for name in ("segmentation", "anomaly", "ground-lesion-in-the-left-frontal-lobe"):
        entry = summary["outputs"][name]
        assert Path(entry["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert_in_geometry(read_volume(entry["file"], allow_constant=True), colin)
    assert summary["outputs"]["ground-lesion-in-the-left-frontal-lobe"]["query"] == QUERY


def test_infer_cli_reports_a_bad_volume_and_fails(bundle, tmp_path, capsys):
    from decipher_mr.cli import main

    rc = main(["infer", "--bundle", str(bundle), "--volume", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path)])
    assert rc == 2
    assert "missing.nii.gz: file or folder does not exist" in capsys.readouterr().err
