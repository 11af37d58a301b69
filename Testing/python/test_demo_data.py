"""The demo corpus generator: deterministic, real anatomy, consistent labels, honest about what is generated.

The corpus under test is the session's shared one (``conftest.demo_corpus``: 8 subjects, seed 0),
built from the real Colin27/MNI152 templates and the AAL atlas, written to disk and read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from decipher_mr.data.demo import build_demo_corpus, plan_corpus, region_counts
from decipher_mr.data.demo.anatomy import aal_name_in_words
from decipher_mr.data.demo.contrast import TISSUE_VALUE
from decipher_mr.data.volume import Volume

from conftest import DEMO_SEED, DEMO_SUBJECTS


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read(root: Path, rel: str) -> Volume:
    path = root / rel
    return Volume.from_sitk(sitk.ReadImage(str(path)), str(path))


@pytest.fixture(scope="module")
def corpus(demo_corpus) -> tuple[Path, list[dict]]:
    return demo_corpus.parent, _rows(demo_corpus)


@pytest.fixture(scope="module")
def same_seed_again(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_again")
    return build_demo_corpus(out, subjects=DEMO_SUBJECTS, seed=DEMO_SEED, progress=False)


def test_same_seed_gives_identical_arrays_and_reports(corpus, same_seed_again):
    root, rows = corpus
    again_root, again_rows = same_seed_again.parent, _rows(same_seed_again)
    assert [r["id"] for r in rows] == [r["id"] for r in again_rows]
    assert rows == again_rows
    for row in rows:
        for key in ("image", "mask", "regions", "tissue"):
            a, b = _read(root, row[key]), _read(again_root, row[key])
            assert a.same_geometry(b), (row["id"], key)
            np.testing.assert_array_equal(a.array, b.array, err_msg=f"{row['id']} {key}")
        assert (root / row["report"]).read_bytes() == (again_root / row["report"]).read_bytes()


def test_another_seed_gives_a_different_corpus(corpus, tmp_path):
    root, rows = corpus
    other = build_demo_corpus(tmp_path / "other", subjects=3, seed=DEMO_SEED + 1, progress=False)
    first = _rows(other)[0]
    assert first["id"] == rows[0]["id"]
    a, b = _read(root, rows[0]["image"]), _read(other.parent, first["image"])
    assert a.shape != b.shape or not np.array_equal(a.array, b.array)


def test_every_manifest_row_points_at_3d_files_with_positive_spacing(corpus):
    root, rows = corpus
    assert len(rows) == DEMO_SUBJECTS
    for row in rows:
        assert row["body_region"] in ("brain", "knee", "spine", "abdomen")
        assert row["sequence"] in ("T1", "T2", "FLAIR")
        image = _read(root, row["image"])
        assert image.array.ndim == 3 and min(image.shape) > 8
        assert all(s > 0 for s in image.spacing)
        assert np.isclose(abs(np.linalg.det(image.direction)), 1.0)
        for key in ("mask", "regions", "tissue"):
            other = _read(root, row[key])
            assert other.same_geometry(image), (row["id"], key)
        assert (root / row["report"]).is_file()
        assert (root / row["region_labels"]).is_file()


def test_written_geometry_matches_the_recorded_orientation(corpus):
    root, rows = corpus
    letters = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}
    seen = set()
    for row in rows:
        direction = _read(root, row["image"]).direction
        code = "".join(letters[(int(np.argmax(np.abs(c))), int(np.sign(c[np.argmax(np.abs(c))])))] for c in direction.T)
        assert code == row["acquisition"]["orientation"]
        seen.add(code)
    assert len(seen) > 1, "every subject was written in the same orientation"


def test_lesion_masks_are_non_empty_exactly_for_lesion_cases_with_the_recorded_volume(corpus):
    root, rows = corpus
    assert {r["labels"]["lesion_present"] for r in rows} == {0, 1}
    for row in rows:
        labels = row["labels"]
        mask = _read(root, row["mask"])
        voxels = int(np.count_nonzero(mask.array))
        if labels["lesion_present"]:
            assert voxels > 0, row["id"]
            expected_ml = voxels * float(np.prod(mask.spacing)) / 1000.0
            assert labels["lesion_volume_ml"] == pytest.approx(expected_ml, rel=1e-3)
            assert labels["lesion_type"] != "none"
            centre = np.asarray(labels["lesion_center_mm"])
            world = mask.affine_lps @ np.append(np.argwhere(mask.array).mean(axis=0), 1.0)
            assert np.allclose(world[:3], centre, atol=0.05)
        else:
            assert voxels == 0, row["id"]
            assert labels["lesion_type"] == "none" and labels["lesion_region"] is None


def test_brain_lesions_lie_inside_the_brain_and_have_an_aal_region(corpus):
    root, rows = corpus
    brain_values = [TISSUE_VALUE[n] for n in ("csf", "grey_matter", "white_matter")]
    lesions = [r for r in rows if r["body_region"] == "brain" and r["labels"]["lesion_present"]]
    assert lesions
    for row in lesions:
        mask = _read(root, row["mask"]).array > 0
        tissue = _read(root, row["tissue"]).array
        assert np.isin(tissue[mask], brain_values).all(), row["id"]
        assert row["labels"]["lesion_region"] in aal_region_names_set()


def aal_region_names_set() -> set[str]:
    from decipher_mr import assets

    return set(assets.aal_region_names().values())


def test_phantom_lesions_lie_inside_the_body(corpus):
    root, rows = corpus
    for row in rows:
        if row["body_region"] != "brain" and row["labels"]["lesion_present"]:
            mask = _read(root, row["mask"]).array > 0
            assert (_read(root, row["regions"]).array[mask] > 0).all(), row["id"]


def test_reports_name_body_region_sequence_and_lesion_location(corpus):
    root, rows = corpus
    for row in rows:
        text = (root / row["report"]).read_text(encoding="utf-8")
        assert text.startswith("EXAMINATION:") and "FINDINGS:" in text and "IMPRESSION:" in text
        assert row["body_region"] in text, row["id"]
        assert row["sequence"] in text, row["id"]
        if row["labels"]["lesion_present"]:
            assert row["labels"]["lesion_location"] in text, row["id"]


def test_aal_names_become_readable_words():
    assert aal_name_in_words("Frontal_Sup_L") == "left superior frontal gyrus"
    assert aal_name_in_words("Cerebelum_Crus1_R") == "right cerebellar crus I"
    assert aal_name_in_words("Vermis_1_2") == "cerebellar vermis lobule I-II"


def test_corpus_spans_body_regions_and_every_split_holds_every_region(corpus):
    _, rows = corpus
    regions = {r["body_region"] for r in rows}
    assert len(regions) >= 2
    for region in regions:
        assert {r["split"] for r in rows if r["body_region"] == region} == {"train", "val", "test"}
    assert region_counts(48) == {"brain": 24, "knee": 8, "spine": 8, "abdomen": 8}
    plans = plan_corpus(48, seed=0)
    normal = sum(p.lesion_type is None for p in plans)
    assert 12 <= normal <= 20  # about a third normal


def test_csf_is_bright_on_t2_and_dark_on_t1_relative_to_white_matter(corpus):
    root, rows = corpus
    ratio = {}
    for row in rows:
        if row["body_region"] != "brain" or row["sequence"] in ratio:
            continue
        image = _read(root, row["image"]).array.astype(np.float64)
        tissue = _read(root, row["tissue"]).array
        lesion = _read(root, row["mask"]).array > 0
        csf = np.median(image[(tissue == TISSUE_VALUE["csf"]) & ~lesion])
        wm = np.median(image[(tissue == TISSUE_VALUE["white_matter"]) & ~lesion])
        ratio[row["sequence"]] = csf / wm
    assert {"T1", "T2"} <= set(ratio)
    assert ratio["T1"] < 0.6
    assert ratio["T2"] > 1.4
    if "FLAIR" in ratio:
        assert ratio["FLAIR"] < 0.6


def test_readme_and_manifest_say_what_is_generated(corpus):
    root, rows = corpus
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "generated" in readme.lower() and "not clinical data" in readme
    assert "Colin27" in readme and "AAL" in readme
    for row in rows:
        assert row["generated"]["report"]
        if row["body_region"] != "brain":
            assert "phantom" in row["generated"]["anatomy"]
    header = (root / "regions" / "aal_labels.csv").read_text(encoding="utf-8").splitlines()
    assert header[0] == "value,name" and "1,Precentral_L" in header


def test_command_line_builds_a_corpus_and_prints_what_it_holds(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "decipher_mr", "demo-data", "--out", str(out), "--subjects", "3", "--seed", "5", "--quiet"],
        capture_output=True, encoding="utf-8", errors="replace",
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout and "brain 3" in done.stdout and "split" in done.stdout
    assert (out / "manifest.jsonl").is_file()


def test_command_line_refuses_too_few_subjects(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "decipher_mr", "demo-data", "--out", str(tmp_path / "x"), "--subjects", "2"],
        capture_output=True, encoding="utf-8", errors="replace",
    )
    assert done.returncode == 2 and "at least 3" in done.stderr
