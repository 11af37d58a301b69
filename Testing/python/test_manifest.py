"""The JSON Lines manifest: path resolution, defaults, and an error naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decipher_mr.data.manifest import ManifestError, read_manifest, write_manifest


def manifest_file(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "data" / "manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    path = manifest_file(tmp_path, [{"image": "sub-01/t1.nii.gz", "report": "sub-01/r.txt", "mask": "m.nii.gz", "regions": "/abs/aal.nii.gz"}])
    row = read_manifest(path)[0]
    assert row.image == str(tmp_path / "data" / "sub-01" / "t1.nii.gz")
    assert row.report == str(tmp_path / "data" / "sub-01" / "r.txt")
    assert row.mask == str(tmp_path / "data" / "m.nii.gz")
    assert row.regions == "/abs/aal.nii.gz"


def test_default_id_is_derived_from_the_image_path(tmp_path):
    path = manifest_file(tmp_path, [{"image": "sub-01/anat/T1w.nii.gz"}, {"image": "sub-02/anat/T1w.nii.gz"}, {"image": "dicom/series 3"}])
    assert [r.id for r in read_manifest(path)] == ["sub-01_anat_T1w", "sub-02_anat_T1w", "dicom_series_3"]


def test_known_fields_and_unknown_keys_are_kept(tmp_path):
    line = {"image": "a.nii.gz", "id": "a1", "report_text": "x", "body_region": "brain", "sequence": "T1w",
            "labels": {"lesion": 1}, "split": "val", "study_id": "S1", "scanner": "3T", "age": 54}
    row = read_manifest(manifest_file(tmp_path, [line]))[0]
    assert (row.id, row.body_region, row.sequence, row.split, row.study_id) == ("a1", "brain", "T1w", "val", "S1")
    assert row.labels == {"lesion": 1} and row.report_text == "x"
    assert row.extra == {"scanner": "3T", "age": 54}
    assert row.line == 1


def test_a_line_that_is_not_json_names_file_and_line(tmp_path):
    path = manifest_file(tmp_path, [{"image": "a.nii.gz"}, "", '{"image": "b.nii.gz",'])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert f"{path}:3" in str(err.value) and "line 3: not valid JSON" in str(err.value)
    assert err.value.line == 3


def test_labels_that_are_not_an_object_name_the_field(tmp_path):
    path = manifest_file(tmp_path, [{"image": f"{i}.nii.gz"} for i in range(6)] + [{"image": "x.nii.gz", "labels": [1, 2]}])
    with pytest.raises(ManifestError, match=r"line 7, field 'labels': expected an object, got list") as err:
        read_manifest(path)
    assert err.value.field == "labels"


def test_missing_image_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="line 1, field 'image': missing"):
        read_manifest(manifest_file(tmp_path, [{"report": "r.txt"}]))


def test_a_field_of_the_wrong_type_is_named(tmp_path):
    with pytest.raises(ManifestError, match="field 'sequence': expected a string, got number"):
        read_manifest(manifest_file(tmp_path, [{"image": "a.nii.gz", "sequence": 3}]))


def test_an_unknown_split_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="field 'split': expected one of train, val, test"):
        read_manifest(manifest_file(tmp_path, [{"image": "a.nii.gz", "split": "training"}]))


def test_report_file_and_inline_report_together_are_an_error(tmp_path):
    with pytest.raises(ManifestError, match="field 'report'"):
        read_manifest(manifest_file(tmp_path, [{"image": "a.nii.gz", "report": "r.txt", "report_text": "x"}]))


def test_an_id_that_is_not_a_file_name_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="field 'id'"):
        read_manifest(manifest_file(tmp_path, [{"image": "a.nii.gz", "id": "../escape"}]))


def test_duplicate_ids_name_both_lines(tmp_path):
    path = manifest_file(tmp_path, [{"image": "a.nii.gz", "id": "s1"}, {"image": "b.nii.gz"}, {"image": "c.nii.gz", "id": "s1"}])
    with pytest.raises(ManifestError, match=r"line 3, field 'id': duplicate id 's1' \(also on line 1\)"):
        read_manifest(path)


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="line 1: expected a JSON object, got list"):
        read_manifest(manifest_file(tmp_path, [["a.nii.gz"]]))


def test_non_strict_reading_returns_good_rows_and_one_error_per_bad_line(tmp_path):
    path = manifest_file(tmp_path, [{"image": "a.nii.gz"}, "nonsense", {"image": "b.nii.gz", "labels": "x"}, {"image": "c.nii.gz"}])
    rows, errors = read_manifest(path, strict=False)
    assert [r.id for r in rows] == ["a", "c"]
    assert [(e.line, e.field) for e in errors] == [(2, None), (3, "labels")]


def test_strict_reading_lists_every_bad_line(tmp_path):
    path = manifest_file(tmp_path, ["nonsense", {"image": "b.nii.gz", "labels": "x"}])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert "line 1" in str(err.value) and "line 2" in str(err.value)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


def test_written_manifest_reads_back(tmp_path):
    path = write_manifest([{"image": "a.nii.gz", "split": "train", "labels": {"tumour": 0}}], tmp_path / "m.jsonl")
    row = read_manifest(path)[0]
    assert row.image == str(tmp_path / "a.nii.gz") and row.split == "train" and row.labels == {"tumour": 0}
