"""Batch inference (`decipher-mr infer` on a folder or a manifest) on real anatomy (Colin27).

One bundle load for the whole batch; a bad volume is reported by name and the rest goes on; a rerun
skips what is written; the summary CSV lists every volume; outputs equal single-volume `infer`'s.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from outputs_helpers import colin_small, tiny_bundle, write_scanner_series

from decipher_mr.cli import main
from decipher_mr.data.io import read_volume
from decipher_mr.data.volume import write_volume


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("batch_bundle"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder as a user has it: NIfTI, an oblique NRRD in a subfolder, a DICOM series, a broken file."""
    root = tmp_path_factory.mktemp("batch_data")
    write_volume(colin_small(3), root / "colin-a.nii.gz")
    write_volume(colin_small(4, oblique=True), root / "site2" / "colin-b.nrrd")
    write_scanner_series(colin_small(5), root / "pacs" / "T1", "1.2.826.0.1.3680043.2.1125.4242")
    good = (root / "colin-a.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(good[: len(good) // 3])  # a truncated download
    return root


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "infer_summary.csv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def _infer(bundle, src, out, *extra) -> int:
    return main(["infer", "--bundle", str(bundle), "--volume", str(src), "--out", str(out), "--tasks", "segment,anomaly",
                 "--no-progress", *extra])


def test_a_folder_batch_reports_the_bad_volume_and_writes_the_rest(bundle, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _infer(bundle, data, out) == 1  # one volume failed
    err = capsys.readouterr().err
    assert err.count("loaded ") == 1  # the bundle is loaded once for the batch
    rows = _rows(out)
    assert set(rows) == {"colin-a", "site2_colin-b", "pacs_T1", "broken"}
    assert {k: r["status"] for k, r in rows.items()} == {"colin-a": "ok", "site2_colin-b": "ok", "pacs_T1": "ok",
                                                         "broken": "failed"}
    assert "broken.nii.gz" in rows["broken"]["error"] and rows["broken"]["error"] in err
    for item, src in (("colin-a", data / "colin-a.nii.gz"), ("site2_colin-b", data / "site2" / "colin-b.nrrd"),
                      ("pacs_T1", data / "pacs" / "T1")):
        src_vol = read_volume(src)
        seg = read_volume(out / item / "segmentation.nii.gz")
        assert seg.same_geometry(src_vol), item  # oblique NRRD and DICOM included
        summary = json.loads((out / item / "summary.json").read_text(encoding="utf-8"))
        assert set(summary["outputs"]) == {"segmentation", "anomaly"}
        assert all(f in rows[item]["outputs"] for f in (f"{item}/segmentation.nii.gz", f"{item}/summary.json"))
    assert not list(out.rglob("*.png"))  # no previews in a batch unless asked


def test_a_rerun_skips_what_is_written_and_redoes_what_changed(bundle, data, tmp_path):
    out = tmp_path / "out"
    _infer(bundle, data, out)
    written = out / "colin-a" / "segmentation.nii.gz"
    before = written.stat().st_mtime_ns
    assert _infer(bundle, data, out) == 1
    rows = _rows(out)
    assert [rows[k]["status"] for k in ("colin-a", "site2_colin-b", "pacs_T1")] == ["skipped"] * 3
    assert rows["broken"]["status"] == "failed"  # failures are retried, and fail again
    assert written.stat().st_mtime_ns == before
    (out / "site2_colin-b" / "anomaly.nii.gz").unlink()  # an output gone: that volume is redone
    _infer(bundle, data, out)
    assert _rows(out)["site2_colin-b"]["status"] == "ok" and _rows(out)["colin-a"]["status"] == "skipped"
    main(["infer", "--bundle", str(bundle), "--volume", str(data), "--out", str(out), "--tasks", "segment",
          "--no-progress"])  # other tasks: not the same outputs, redone
    assert _rows(out)["colin-a"]["status"] == "ok"


def test_batch_outputs_equal_single_volume_infer(bundle, data, tmp_path):
    batch, one = tmp_path / "batch", tmp_path / "one"
    _infer(bundle, data, batch)
    assert _infer(bundle, data / "site2" / "colin-b.nrrd", one, "--no-previews") == 0
    for name in ("segmentation.nii.gz", "anomaly.nii.gz", "anomaly-mask.nii.gz"):
        a, b = read_volume(batch / "site2_colin-b" / name), read_volume(one / name)
        assert a.same_geometry(b) and np.array_equal(a.array, b.array), name


def test_a_manifest_batch_names_the_bad_line_and_goes_on(bundle, data, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"image": str(data / "colin-a.nii.gz"), "id": "sub-a", "report_text": "SECRET REPORT TEXT"}),
        json.dumps({"image": str(data / "pacs" / "T1"), "id": "sub-dicom"}),
        '{"image": 42}',
        json.dumps({"image": str(tmp_path / "missing.nii.gz"), "id": "sub-missing"}),
    ]) + "\n")
    out = tmp_path / "out"
    assert _infer(bundle, manifest, out) == 1
    rows = _rows(out)
    assert rows["sub-a"]["status"] == "ok" and rows["sub-dicom"]["status"] == "ok"
    bad = [r for r in rows.values() if r["status"] == "failed"]
    assert len(bad) == 2
    assert any(":3" in r["input"] + r["error"] and "image" in r["error"] for r in bad)  # line 3, field image
    assert any("missing.nii.gz" in r["error"] for r in bad)
    assert "SECRET" not in (out / "infer_summary.csv").read_text(encoding="utf-8")  # report text is never written out
    assert (out / "sub-a" / "segmentation.nii.gz").is_file()


def test_a_single_dicom_series_folder_is_one_volume_and_gets_a_dicom_seg(bundle, data, tmp_path):
    out = tmp_path / "one"
    assert _infer(bundle, data / "pacs" / "T1", out, "--dicom-seg", "--no-previews") == 0
    assert (out / "summary.json").is_file() and (out / "segmentation.dcm").is_file()
    assert not (out / "infer_summary.csv").exists()
