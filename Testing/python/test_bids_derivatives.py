"""BIDS in, BIDS derivatives out: `decipher-mr infer --volume <bids>` on a BIDS tree of real anatomy
(Colin27), checked with pybids (validated layout with the derivative dataset) and the BIDS schema's
derivative file rules (bidsschematools)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from outputs_helpers import colin_small, tiny_bundle

from decipher_mr.cli import main
from decipher_mr.data.io import read_volume
from decipher_mr.data.volume import write_volume
from decipher_mr.inference.derivatives import derivative_name_problems, source_parts

SOURCES = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-1_T2w.nii.gz"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bids_bundle"))


@pytest.fixture(scope="module")
def bids(bundle, tmp_path_factory) -> Path:
    """A BIDS dataset already run through `infer` once (its derivatives are in place)."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "Colin27 test", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t33\nsub-02\t33\n")
    for n, rel in enumerate(SOURCES):
        write_volume(colin_small(3 + n, oblique=n == 2), root / rel)
        (root / rel.replace(".nii.gz", ".json")).write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    assert _run(bundle, root) == 0
    return root


def _run(bundle, bids, *extra) -> int:
    return main(["infer", "--bundle", str(bundle), "--volume", str(bids), "--tasks", "segment,anomaly", "--no-progress",
                 *extra])


def test_bids_input_writes_a_valid_derivative_dataset(bundle, bids):
    from bids import BIDSLayout

    deriv = bids / "derivatives" / "decipher-mr"
    assert derivative_name_problems(deriv) == []  # every file passes the schema's derivative rules

    layout = BIDSLayout(str(bids), validate=True, derivatives=str(deriv))
    assert len(layout.get(suffix=["T1w", "T2w"], extension=".nii.gz")) == 3  # the sources, not our outputs
    ours = layout.derivatives["decipher-mr"]
    dseg = ours.get(suffix="dseg", extension=".nii.gz")
    probseg = ours.get(suffix="probseg", extension=".nii.gz")
    assert len(dseg) == 3 and len(probseg) == 3 and len(ours.get(suffix="mask", extension=".nii.gz")) == 3
    assert {f.entities["subject"] for f in dseg} == {"01", "02"}
    assert sorted(f.entities.get("desc") for f in dseg) == ["T1w", "T1w", "T2w"]

    desc = json.loads((deriv / "dataset_description.json").read_text(encoding="utf-8"))
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "decipher-mr"
    assert desc["DatasetLinks"]["raw"] == "../../"


@pytest.mark.parametrize("n", range(len(SOURCES)))
def test_each_derivative_is_named_after_its_source_on_its_grid_with_provenance(bundle, bids, n):
    from decipher_mr.inference import Session

    deriv = bids / "derivatives" / "decipher-mr"
    folder, prefix, suffix = source_parts(SOURCES[n])
    base = deriv / folder / prefix
    source = read_volume(bids / SOURCES[n])
    seg = read_volume(f"{base}_seg-lobes_desc-{suffix}_dseg.nii.gz")
    heat = read_volume(f"{base}_label-lesion_desc-{suffix}_probseg.nii.gz")
    assert seg.same_geometry(source) and heat.same_geometry(source)  # the oblique T2w too
    assert 0.0 <= heat.array.min() and heat.array.max() <= 1.0

    side = json.loads(Path(f"{base}_seg-lobes_desc-{suffix}_dseg.json").read_text(encoding="utf-8"))
    assert side["Sources"] == [f"bids:raw:{SOURCES[n]}"]
    prov = side["DecipherMR"]
    assert prov["BundleFingerprint"] == Session.from_bundle(bundle, device="cpu").fingerprint
    assert prov["BundleName"] == "tiny-outputs-test" and prov["Version"] and "infer" in prov["Command"]

    with open(f"{base}_seg-lobes_desc-{suffix}_dseg.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["name"] for r in rows] == ["background", "frontal lobe", "temporal lobe", "cerebellum", "unnamed structure"]
    assert rows[1]["type"] == "SCT^83251001^Frontal lobe" and rows[0]["type"] == "n/a"
    assert set(np.unique(seg.array)) <= {int(r["index"]) for r in rows}


def test_a_rerun_on_bids_skips_and_the_summary_is_ignored_by_validators(bundle, bids):
    deriv = bids / "derivatives" / "decipher-mr"
    assert _run(bundle, bids) == 0
    with open(deriv / "infer_summary.csv", newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped"] * 3
    assert (deriv / ".bidsignore").read_text(encoding="utf-8").split() == ["infer_summary.csv"]
    assert derivative_name_problems(deriv) == []


def test_a_badly_named_source_image_is_reported_and_the_rest_is_written(bundle, bids, tmp_path):
    stray = bids / "sub-01" / "anat" / "T1_scan.nii.gz"
    write_volume(colin_small(5), stray)
    try:
        out = tmp_path / "deriv"
        assert _run(bundle, bids, "--out", str(out)) == 1
        with open(out / "infer_summary.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["status"] for r in rows].count("ok") == 3
        (bad,) = [r for r in rows if r["status"] == "failed"]
        assert "T1_scan.nii.gz" in bad["error"] and "BIDS" in bad["error"]
    finally:
        stray.unlink()


def test_the_name_check_catches_a_non_bids_file(bundle, bids):
    deriv = bids / "derivatives" / "decipher-mr"
    stray = deriv / "sub-01" / "anat" / "sub-01_lobes.nii.gz"
    stray.write_bytes(b"")
    try:
        assert derivative_name_problems(deriv) == ["sub-01/anat/sub-01_lobes.nii.gz"]
    finally:
        stray.unlink()
