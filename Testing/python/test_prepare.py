"""`prepare`: a manifest of real Colin27/AAL series becomes a cache; bad items are listed, runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from decipher_mr.assets import aal_atlas, colin27_t1
from decipher_mr.cli import main as cli_main
from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.io import write_dicom_series
from decipher_mr.data.manifest import write_manifest
from decipher_mr.data.prepare import PrepareError, prepare_manifest
from decipher_mr.data.preprocess import GeometryRecord, PreprocessConfig, restore
from decipher_mr.data.volume import Volume, write_volume

CONFIG = PreprocessConfig(target_spacing=(5.0, 5.0, 5.0))


def small(path: Path, mm: float, nearest: bool = False) -> Volume:
    """A real volume resampled to ``mm`` isotropic (keeps every test quick)."""
    img = sitk.ReadImage(str(path))
    size = [int(round(n * s / mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), (mm,) * 3, img.GetDirection(), 0.0, img.GetPixelID())
    return Volume.from_sitk(out)


@pytest.fixture(scope="module")
def good_rows(tmp_path_factory) -> list[dict]:
    """Three good series of real anatomy with reports, a lesion-style mask and AAL regions."""
    root = tmp_path_factory.mktemp("data")
    t1, bet, aal = small(colin27_t1(), 4.0), small(colin27_t1("ch2bet"), 4.0), small(aal_atlas(), 4.0, nearest=True)
    write_volume(t1, root / "ch2.nii.gz")
    write_volume(bet, root / "ch2bet.mha")
    write_volume(aal, root / "aal.nii.gz")
    write_volume(aal.with_array((aal.array == 1).astype(np.uint8)), root / "precentral_l.nii.gz")
    (root / "ch2.txt").write_text("FINDINGS: no acute abnormality.\n", encoding="utf-8")
    rows = [
        {"image": "ch2.nii.gz", "report": "ch2.txt", "mask": "precentral_l.nii.gz", "regions": "aal.nii.gz",
         "body_region": "brain", "sequence": "T1w", "split": "train", "labels": {"lesion": 0}, "scanner": "3T"},
        {"image": "ch2bet.mha", "report_text": "skull-stripped T1", "regions": "aal.nii.gz", "split": "val"},
        {"image": str(colin27_t1()), "id": "ch2_full", "split": "test"},
    ]
    write_manifest(rows, root / "good.jsonl")
    return [{**r, **{k: str(root / r[k]) for k in ("image", "report", "mask", "regions") if k in r}} for r in rows]


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> dict[str, dict]:
    """One manifest row per kind of bad input, keyed by what is wrong."""
    root = tmp_path_factory.mktemp("bad")
    t1 = small(colin27_t1(), 4.0)
    data = Path(colin27_t1()).read_bytes()
    (root / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    img = t1.to_sitk()
    sitk.WriteImage(img[:, :, 20], str(root / "flat2d.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([img, img]), str(root / "fmri4d.nii.gz"))
    nan = t1.array.astype(np.float32)
    nan[5, 5, 5] = np.nan
    write_volume(t1.with_array(nan), root / "nan.nii.gz")
    write_volume(t1.with_array(np.full(t1.shape, 3, np.int16)), root / "constant.nii.gz")
    write_volume(small(colin27_t1(), 2.0), root / "huge.nii.gz")  # ~0.9 M voxels > --max-voxels below
    write_volume(t1, root / "t1.nii.gz")
    (root / "latin1.txt").write_bytes("Läsion".encode("latin-1"))
    write_dicom_series(t1, root / "mixed", "1.2.826.0.1.3680043.2.1125.9.1", "first")
    write_dicom_series(Volume(t1.array[:, :, :8], t1.spacing, t1.origin, t1.direction), root / "mixed", "1.2.826.0.1.3680043.2.1125.9.2", "second")
    return {
        "truncated": {"image": str(root / "truncated.nii.gz")},
        "2D": {"image": str(root / "flat2d.nii.gz")},
        "4D": {"image": str(root / "fmri4d.nii.gz")},
        "NaN": {"image": str(root / "nan.nii.gz")},
        "constant": {"image": str(root / "constant.nii.gz")},
        "exceed the limit": {"image": str(root / "huge.nii.gz")},
        "does not exist": {"image": str(root / "missing.nii.gz")},
        "not valid UTF-8": {"image": str(root / "t1.nii.gz"), "id": "latin1_report", "report": str(root / "latin1.txt")},
        "mixes 2 series": {"image": str(root / "mixed")},
    }


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "items").iterdir()}


def cache_content(folder: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    rows = [json.loads(line) for line in (folder / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    arrays = {p.name: np.load(p) for p in sorted((folder / "items").iterdir())}
    return rows, arrays


def test_prepared_cache_holds_arrays_masks_reports_and_geometry(tmp_path, good_rows):
    write_manifest(good_rows, tmp_path / "m.jsonl")
    summary = prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    assert summary.ok and sorted(summary.prepared) == ["ch2", "ch2_full", "ch2bet"]

    cache = PreparedCache(tmp_path / "cache")
    assert cache.meta["preprocess"] == CONFIG.to_json() and cache.meta["format"] == 1
    item = cache.select(split="train")[0]
    i = cache.items.index(item)
    arr, mask = cache.load(i), cache.load_mask(i)
    assert arr.dtype == np.float32 and arr.shape == item.shape == mask.shape
    assert item.spacing == (5.0, 5.0, 5.0)
    assert item.report == "FINDINGS: no acute abnormality.\n"
    assert (item.body_region, item.sequence, item.labels, item.extra["scanner"]) == ("brain", "T1w", {"lesion": 0}, "3T")
    regions = np.load(tmp_path / "cache" / item.extra["regions"])
    assert regions.shape == arr.shape and regions.dtype == np.uint8 and len(np.unique(regions)) > 100
    assert set(np.unique(mask)) == {0, 1}

    record = GeometryRecord.from_json(item.extra["geometry"])
    back = restore(np.asarray(mask), record, interpolation="nearest")
    src = Volume.from_sitk(sitk.ReadImage(good_rows[0]["mask"]))
    assert back.same_geometry(src, atol=0)
    assert cache.select(split="val")[0].report == "skull-stripped T1"


def test_a_manifest_mixing_good_and_bad_rows_prepares_the_good_ones_and_lists_the_bad(tmp_path, good_rows, bad_rows):
    write_manifest(good_rows[:2] + list(bad_rows.values()), tmp_path / "m.jsonl")
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"image": "broken.nii.gz", \n')
    code = cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "5",
                     "--max-voxels", "500000", "--no-progress"])
    assert code == 1
    assert len(PreparedCache(tmp_path / "cache")) == 2
    failures = json.loads((tmp_path / "cache" / "failures.json").read_text(encoding="utf-8"))
    assert len(failures) == len(bad_rows) + 1
    for problem, row in bad_rows.items():
        reason = next(f["reason"] for f in failures if f["source"] == row["image"])
        assert problem in reason
        assert (row.get("report") or row["image"]) in reason  # the message names the offending file
    assert any("not valid JSON" in f["reason"] and f["line"] == len(good_rows[:2]) + len(bad_rows) + 1 for f in failures)


def test_allow_failures_turns_the_exit_code_to_zero(tmp_path, good_rows, bad_rows):
    write_manifest([good_rows[0], bad_rows["truncated"]], tmp_path / "m.jsonl")
    code = cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "5",
                     "--allow-failures", "--no-progress"])
    assert code == 0
    assert len(PreparedCache(tmp_path / "cache")) == 1
    assert len(json.loads((tmp_path / "cache" / "failures.json").read_text(encoding="utf-8"))) == 1


def test_resuming_skips_finished_items_and_matches_a_straight_run(tmp_path, good_rows):
    write_manifest(good_rows[:1], tmp_path / "half.jsonl")
    write_manifest(good_rows, tmp_path / "all.jsonl")
    prepare_manifest(tmp_path / "half.jsonl", tmp_path / "resumed", CONFIG, progress=False)
    before = mtimes(tmp_path / "resumed")
    summary = prepare_manifest(tmp_path / "all.jsonl", tmp_path / "resumed", CONFIG, progress=False)
    assert summary.skipped == ["ch2"] and sorted(summary.prepared) == ["ch2_full", "ch2bet"]
    after = mtimes(tmp_path / "resumed")
    assert all(after[name] == t for name, t in before.items())  # finished items were not recomputed

    prepare_manifest(tmp_path / "all.jsonl", tmp_path / "straight", CONFIG, progress=False)
    rows_a, arrays_a = cache_content(tmp_path / "resumed")
    rows_b, arrays_b = cache_content(tmp_path / "straight")
    assert rows_a == rows_b
    assert arrays_a.keys() == arrays_b.keys()
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


def test_a_changed_source_file_is_prepared_again(tmp_path, good_rows):
    write_manifest(good_rows[:2], tmp_path / "m.jsonl")
    prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    report = Path(good_rows[0]["report"])
    os.utime(report, ns=(time.time_ns(), report.stat().st_mtime_ns + 10**9))
    summary = prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    assert summary.prepared == ["ch2"] and summary.skipped == ["ch2bet"]


def test_changed_manifest_metadata_updates_the_index_without_recomputing(tmp_path, good_rows):
    write_manifest(good_rows[:1], tmp_path / "m.jsonl")
    prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    before = mtimes(tmp_path / "cache")
    write_manifest([{**good_rows[0], "split": "val"}], tmp_path / "m.jsonl")
    summary = prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    assert summary.skipped == ["ch2"]
    assert PreparedCache(tmp_path / "cache").items[0].split == "val"
    assert mtimes(tmp_path / "cache") == before


def test_other_settings_on_an_existing_cache_are_refused(tmp_path, good_rows):
    write_manifest(good_rows[:1], tmp_path / "m.jsonl")
    prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", CONFIG, progress=False)
    with pytest.raises(PrepareError, match="different settings.*target_spacing.*new --out"):
        prepare_manifest(tmp_path / "m.jsonl", tmp_path / "cache", PreprocessConfig(target_spacing=(3, 3, 3)), progress=False)
    code = cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "3", "--no-progress"])
    assert code == 2


def test_two_worker_processes_give_the_same_cache_as_one(tmp_path, good_rows):
    write_manifest(good_rows, tmp_path / "m.jsonl")
    prepare_manifest(tmp_path / "m.jsonl", tmp_path / "one", CONFIG, progress=False)
    summary = prepare_manifest(tmp_path / "m.jsonl", tmp_path / "two", CONFIG, workers=2, progress=False)
    assert summary.ok and len(summary.prepared) == 3
    rows_a, arrays_a = cache_content(tmp_path / "one")
    rows_b, arrays_b = cache_content(tmp_path / "two")
    assert rows_a == rows_b and all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


def test_a_killed_run_leaves_a_readable_cache_that_the_next_run_completes(tmp_path, good_rows):
    # Full-resolution Colin27 at native spacing is slow enough that the kill lands mid-run.
    rows = [{"image": str(colin27_t1(v)), "id": f"{v}_{n}"} for n in range(3) for v in ("ch2", "ch2bet")]
    write_manifest(rows, tmp_path / "m.jsonl")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "decipher_mr", "prepare", str(tmp_path / "m.jsonl"), "--out", str(out), "--spacing", "native", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = out / "index.jsonl"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if index.exists() and index.read_text(encoding="utf-8").count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    done = len(PreparedCache(out))  # the index is never half-written
    print("items done when killed:", done, "of", len(rows))
    assert 1 <= done
    before = mtimes(out)
    config = PreprocessConfig(target_spacing=None)
    summary = prepare_manifest(tmp_path / "m.jsonl", out, config, progress=False)
    assert len(summary.skipped) == done and len(summary.prepared) == len(rows) - done
    assert len(PreparedCache(out)) == len(rows)
    after = mtimes(out)
    assert all(after[name] == t for name, t in before.items() if name.endswith(".npy") and not name.startswith("."))


def test_cli_spacing_accepts_anisotropic_values(tmp_path, good_rows):
    write_manifest(good_rows[:1], tmp_path / "m.jsonl")
    code = cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "4,4,8", "--no-progress"])
    assert code == 0
    cache = PreparedCache(tmp_path / "cache")
    assert cache.meta["preprocess"]["target_spacing"] == [4.0, 4.0, 8.0]
    assert cache.items[0].spacing == (4.0, 4.0, 8.0)


def test_report_text_never_reaches_the_console(tmp_path, good_rows, bad_rows, capsys):
    write_manifest([good_rows[0], good_rows[1], bad_rows["not valid UTF-8"]], tmp_path / "m.jsonl")
    cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--spacing", "5"])
    printed = capsys.readouterr()
    for secret in ("FINDINGS", "skull-stripped T1", "Läsion", "L\\xe4sion"):
        assert secret not in printed.out + printed.err
