"""The browser viewer, clicked through in Debian's headless Chromium.

Each test starts the real ``decipher-mr view`` (trame-slicer on Slicer's MRML scene, the model in the
persistent worker process) with a small bundle trained in the set-up, opens the page, loads the real
Colin27 volume by typing its path, and then uses the panel as a person would. It checks both the
scene the server holds (mirrored into the page's state from MRML) and what the slice view shows
(screenshots of the view before and after). Screenshots are kept under ``Testing/artifacts/viewer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer")
sync_api = pytest.importorskip("playwright.sync_api")

from browser import ViewerPage, ViewerServer, colour_mask, headless_chromium, window  # noqa: E402

from decipher_mr import assets  # noqa: E402

QUERY = "lesion in the left frontal lobe"


# `make screenshots` runs these tests on the demo model (after `make demo`) for the README's pictures.
MODEL_ENV = ("DECIPHER_MR_VIEWER_BUNDLE", "DECIPHER_MR_VIEWER_INDEX", "DECIPHER_MR_VIEWER_MANIFEST")


@pytest.fixture(scope="module")
def model(request, tmp_path_factory):
    """(bundle, index, manifest): by default a bundle with segment, anomaly and grounding heads (a few
    iterations) and an index of the test corpus; the three variables above choose another model."""
    if all(os.environ.get(name) for name in MODEL_ENV):
        return tuple(Path(os.environ[name]) for name in MODEL_ENV)
    from bundle_factory import shared_test_bundle

    from decipher_mr.index import build_index
    from decipher_mr.inference import Session

    cache, corpus = request.getfixturevalue("prepared_demo_cache"), request.getfixturevalue("demo_corpus")
    bundle = shared_test_bundle(cache, tmp_path_factory)
    index = tmp_path_factory.mktemp("viewer_index") / "index"
    build_index(Session.from_bundle(bundle, device="cpu", heads=[]), corpus, index, progress=False)
    return bundle, index, corpus


browser = pytest.fixture(scope="module", name="browser")(headless_chromium)


@pytest.fixture()
def viewer(model, tmp_path):
    bundle, index, _ = model
    server = ViewerServer("--bundle", str(bundle), "--index", str(index), "--device", "cpu", log_dir=tmp_path,
                          data_roots=[tmp_path])
    yield server
    server.close()


@pytest.fixture()
def page(viewer, browser):
    p = ViewerPage(browser, viewer.url)
    yield p
    p.page.close()


@pytest.fixture()
def colin(page):
    """The page with Colin27 opened by typing its path and pressing Enter."""
    page.open_volume(assets.colin27_t1())
    volumes = page.scene("ScalarVolume")
    assert [v["name"] for v in volumes] == ["ch2"] and volumes[0]["dims"] == [181, 217, 181]
    return page


def test_text_query_highlights_the_region_and_jumps_the_views(colin):
    page = colin
    before = page.view_image("Red", name="query-before")
    job = page.run_job(lambda: page.type_and_enter("#dmr-query", QUERY))
    assert job == {"name": "query", "outcome": "finished"}, page.state("dmr_error")

    # The scene: a segmentation holding a segment named after the query, and a markup at the peak.
    segmentations = page.scene("Segmentation")
    assert len(segmentations) == 1 and segmentations[0]["segments"] == [QUERY]
    markups = page.scene("MarkupsFiducial")
    assert len(markups) == 1 and len(markups[0]["points"]) == 1
    highlight = page.state("dmr_highlight")
    assert highlight["ras"] == pytest.approx(markups[0]["points"][0]["ras"], abs=0.01)

    # The axial view: coloured pixels (segment fill, markup) appear where the highlight is.
    after = page.view_image("Red", name="query-after")
    page.screenshot("viewer-query")
    for tag in ("Red", "Green", "Yellow"):  # every slice view jumped to the peak: it shows the peak's slice
        assert abs(highlight["views"][tag][2]) < 0.5, (tag, highlight["views"][tag])
    at = highlight["views"]["Red"][:2]
    assert 0.0 <= at[0] <= 1.0 and 0.0 <= at[1] <= 1.0, at
    coloured_before = colour_mask(window(before, at)).mean()
    coloured_after = colour_mask(window(after, at)).mean()
    assert coloured_before < 0.01, "the grey MRI had coloured pixels before the query"
    assert coloured_after > 0.02, f"no highlight drawn around {at} ({coloured_after:.4f} of the window coloured)"
    assert np.abs(after - before).mean() > 1.0  # the view jumped to the peak and changed

    # A second query adds a segment to the same segmentation and a second markup.
    job = page.run_job(lambda: page.type_and_enter("#dmr-query", "right occipital lobe"))
    assert job["outcome"] == "finished"
    assert page.scene("Segmentation")[0]["segments"] == [QUERY, "right occipital lobe"]
    assert len(page.scene("MarkupsFiducial")) == 2


def test_segment_button_adds_a_segmentation_that_the_slice_view_shows(colin):
    page = colin
    before = page.view_image("Red")
    job = page.run_job(lambda: page.page.click("#dmr-segment"))
    assert job == {"name": "segment", "outcome": "finished"}, page.state("dmr_error")
    segmentations = page.scene("Segmentation")
    assert len(segmentations) == 1 and len(segmentations[0]["segments"]) >= 2
    after = page.view_image("Red", name="segment-after")
    page.screenshot("viewer-segment")
    assert colour_mask(before).mean() < 0.005
    assert colour_mask(after).mean() > 0.02, "the segmentation is not drawn in the axial view"


def test_anomaly_overlay_and_its_opacity_slider(colin):
    page = colin
    before = page.view_image("Red")
    assert page.page.locator("#dmr-opacity").is_disabled()  # nothing to fade yet
    job = page.run_job(lambda: page.page.click("#dmr-anomaly"))
    assert job == {"name": "anomaly map", "outcome": "finished"}, page.state("dmr_error")
    heatmaps = [v for v in page.scene("ScalarVolume") if v["name"] != "ch2"]
    assert len(heatmaps) == 1
    # on the model's own grid (placed by its IJK->RAS, not resampled): Colin27's 181x217x181 mm at the
    # bundle's spacing, whole voxels
    dims = heatmaps[0]["dims"]
    assert dims != [181, 217, 181] and len({round(n / d, 1) for n, d in zip((181, 217, 181), dims)}) == 1, dims
    shown = page.view_image("Red", name="anomaly-opacity-0.5")
    page.screenshot("viewer-anomaly")
    assert colour_mask(shown).mean() > colour_mask(before).mean() + 0.02, "the heat map is not over the volume"

    # Drag the opacity to 0 with the keyboard (Home on the slider): the overlay disappears.
    thumb = page.page.locator("#dmr-opacity").locator("xpath=..").locator(".v-slider-thumb")
    thumb.focus()
    page.page.keyboard.press("Home")
    page.wait_for(lambda: page.state("dmr_opacity") == 0, "the opacity to reach 0", timeout=20)
    faded = page.view_image("Red", name="anomaly-opacity-0")
    assert colour_mask(faded).mean() < 0.005
    np.testing.assert_allclose(faded.mean(), before.mean(), atol=2.0)  # back to the grey volume
    page.page.keyboard.press("End")
    page.wait_for(lambda: page.state("dmr_opacity") == 1, "the opacity to reach 1", timeout=20)
    full = page.view_image("Red")
    assert colour_mask(full).mean() >= colour_mask(shown).mean()


def test_similar_reports_show_report_text_and_open_the_case(colin, model):
    page, manifest = colin, model[2]
    page.page.fill("#dmr-k", "4")
    job = page.run_job(lambda: page.page.click("#dmr-similar"))
    assert job == {"name": "similar reports", "outcome": "finished"}, page.state("dmr_error")
    hits = page.state("dmr_hits")
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"] >= hits[3]["score"]
    assert page.page.locator("#dmr-hits .v-list-item").count() == 4

    # Select the first result: its full report appears, as written in the corpus.
    page.page.click("#dmr-hit-0")
    page.wait_for(lambda: page.state("dmr_report"), "the report text")
    reports = {}
    for line in Path(manifest).read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item.get("report"):
            path = Path(item["report"])
            path = path if path.is_absolute() else Path(manifest).parent / path
            reports[item.get("study", item.get("id"))] = path.read_text(encoding="utf-8").strip()
    shown = page.page.locator("#dmr-report").input_value().strip()
    assert shown == page.state("dmr_report").strip()
    assert shown in {r.strip() for r in reports.values()}

    # Open the retrieved case: a new volume in the scene, shown in the views.
    before = page.view_image("Red")
    page.page.click("#dmr-open-case")
    page.wait_for(lambda: len(page.scene("ScalarVolume")) == 2, "the case to open")
    after = page.view_image("Red", name="case-opened")
    page.screenshot("viewer-retrieval")
    assert np.abs(after - before).mean() > 1.0

    # Case search by text, with Enter.
    job = page.run_job(lambda: page.type_and_enter("#dmr-find-cases", "glioma in the left frontal lobe"))
    assert job == {"name": "find cases", "outcome": "finished"}
    assert len(page.state("dmr_hits")) == 4


def test_bad_input_is_reported_in_the_page_and_changes_nothing(page, tmp_path):
    import SimpleITK as sitk

    missing = tmp_path / "no-such-volume.nii.gz"
    page.type_and_enter("#dmr-volume-path", str(missing))
    page.wait_for(lambda: page.state("dmr_error"), "an error")
    alert = page.page.locator("#dmr-error")
    alert.wait_for(state="visible", timeout=10_000)
    assert str(missing) in alert.inner_text()
    assert page.scene() == []

    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((32, 32), np.float32)), str(flat))
    page.page.fill("#dmr-volume-path", str(flat))
    page.page.press("#dmr-volume-path", "Enter")
    page.wait_for(lambda: str(flat) in (page.state("dmr_error") or ""), "the 2D error")
    assert "2D" in page.state("dmr_error") or "3D" in page.state("dmr_error"), page.state("dmr_error")
    assert page.scene() == []
    page.screenshot("viewer-error")

    # The buttons that need a volume stay disabled; the viewer is still usable afterwards.
    assert page.page.locator("#dmr-segment").is_disabled()
    page.open_volume(assets.colin27_t1())
    assert len(page.scene("ScalarVolume")) == 1 and page.page.locator("#dmr-segment").is_enabled()


def test_cancel_stops_a_running_job_and_leaves_the_scene_alone(colin):
    page = colin
    nodes = page.scene()
    done = page.state("dmr_jobs_done")
    page.page.click("#dmr-segment")  # the first job also starts the worker and loads the model: seconds
    page.page.locator("#dmr-cancel").click(timeout=10_000)
    page.wait_for(lambda: page.state("dmr_jobs_done") > done, "the job to stop")
    assert page.state("dmr_last_job") == {"name": "segment", "outcome": "cancelled"}
    assert page.scene() == nodes
    # The next run works.
    job = page.run_job(lambda: page.page.click("#dmr-segment"))
    assert job["outcome"] == "finished" and len(page.scene("Segmentation")) == 1


def test_volumes_open_from_an_upload_and_from_a_dicom_folder(page, tmp_path):
    import SimpleITK as sitk

    # A local file the server never saw: a cropped copy of Colin27 sent through the page's upload button.
    image = sitk.ReadImage(str(assets.colin27_t1()))
    local = tmp_path / "upload" / "my-scan.nii.gz"
    local.parent.mkdir()
    sitk.WriteImage(image[40:140, 40:170, 60:120], str(local))
    page.page.locator("input[type=file]").first.set_input_files(str(local))
    page.wait_for(lambda: page.scene("ScalarVolume"), "the upload to open", timeout=60)
    volumes = page.scene("ScalarVolume")
    assert volumes[0]["dims"] == [100, 130, 60] and volumes[0]["name"] == "my-scan"
    assert not page.state("dmr_error")

    # A DICOM series folder on the server, by its path.
    from decipher_mr.data.io import read_volume, write_dicom_series

    volume = read_volume(assets.colin27_t1())
    volume.array = volume.array[30:150, 30:180, 50:110].astype(np.int16)
    folder = write_dicom_series(volume, tmp_path / "dicom" / "T1", series_uid="1.2.826.0.1.3680043.2.1125.77", description="T1")
    page.open_volume(folder)
    assert [v["dims"] for v in page.scene("ScalarVolume")] == [[100, 130, 60], [120, 150, 60]]
    assert page.state("dmr_volume_id") == page.scene("ScalarVolume")[1]["id"]  # the new volume is the input
