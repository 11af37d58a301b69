"""`evaluate heads --bundle`: the task heads evaluated through Session on manifest rows, with intervals.

The bundle is the tiny real one of ``bundle_factory`` (heads trained a few steps by the real loop); the
rows are the real demo corpus (Colin27 / MNI152 brains with AAL regions, phantoms, synthetic lesions)
written by ``build_demo_corpus``. Bootstrap seeds are fixed, so every figure is reproducible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import shared_test_bundle
from decipher_mr.data.volume import Volume
from decipher_mr.eval import heads_session as H
from decipher_mr.eval.stats import NOT_DISTINGUISHABLE
from decipher_mr.inference import Session

N_BOOT = 200


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    return shared_test_bundle(prepared_demo_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(bundle, demo_corpus):
    session = Session.from_bundle(bundle, device="cpu")
    return session, H.evaluate_heads_session(session, demo_corpus, ["all"], n_boot=N_BOOT, seed=0)


def test_every_row_goes_through_one_session_encoding_serving_every_head(evaluated, demo_corpus):
    session, result = evaluated
    rows = [json.loads(line) for line in Path(demo_corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert result["errors"] == []
    assert result["evaluated"] == result["rows"] == len(rows)
    assert set(result["heads"]) == {"segment", "anomaly", "ground"}
    # one encoder pass per volume, and the other heads on that volume reuse it
    assert result["session_stats"]["encoder_passes"] == len(rows)
    assert result["session_stats"]["encode_cache_hits"] >= sum(
        ("segment" in r) + ("anomaly" in r) + ("ground" in r) - 1 for r in result["items"] if len(r) > 3)
    brains_with_lesion = [r for r in rows if r["body_region"] == "brain" and r["labels"]["lesion_present"]]
    assert sum("segment" in r for r in result["items"]) == sum(r["body_region"] == "brain" for r in rows)
    assert sum("voxel_auroc" in r.get("anomaly", {}) for r in result["items"]) == sum(
        r["labels"]["lesion_present"] for r in rows)
    assert sum("side_correct" in r.get("ground", {}) for r in result["items"]) >= len(brains_with_lesion)
    # region queries by name on every brain: its largest left and right AAL region
    for r in result["items"]:
        sides = [g["side"] for g in r.get("ground_structures", [])]
        assert sides == (["left", "right"] if r["body_region"] == "brain" else []), r["id"]
        assert all(g["query"].startswith(g["side"] + " ") for g in r.get("ground_structures", []))
    assert result["figures"]["ground_structure.side_correct"]["n"] == 2 * sum(r["body_region"] == "brain" for r in rows)


def test_structure_queries_name_the_largest_region_of_each_side():
    regions = np.zeros((6, 6, 6), np.int64)
    regions[:2] = 3
    regions[2:3] = 5
    regions[4:] = 4
    names = {0: "background", 3: "Frontal_Sup_L", 5: "Precentral_L", 4: "Frontal_Sup_R", 7: "Vermis_3"}
    assert H.structure_queries(regions, names) == [(3, "left", "left superior frontal gyrus"),
                                                   (4, "right", "right superior frontal gyrus")]
    assert H.structure_queries(regions, {0: "background", 3: "femur"}) == []


def test_every_figure_has_an_interval_around_it_a_count_and_a_verdict(evaluated):
    _, result = evaluated
    figs = result["figures"]
    for key in ("segment.mean_dice", "anomaly.voxel_auroc", "ground.pointing", "ground.distance_mm",
                "ground.side_correct", "ground.centre_point_hit"):
        e = figs[key]
        lo, hi = e["ci"]
        assert lo - 1e-9 <= e["value"] <= hi + 1e-9, (key, e)
        assert e["n"] >= 1 and e["studies"] >= 1 and e["boot"] > 0
        assert e["verdict"] in ("above chance", "below chance", NOT_DISTINGUISHABLE, "no chance level")
    assert figs["anomaly.voxel_auroc"]["chance"] == 0.5 and figs["ground.side_correct"]["chance"] == 0.5
    assert figs["ground.pointing"]["chance"] == pytest.approx(figs["ground.centre_point_hit"]["value"])
    assert figs["ground.distance_mm"]["chance"] == pytest.approx(figs["ground.centre_distance_mm"]["value"])
    assert figs["segment.mean_dice"]["chance"] == pytest.approx(figs["segment.majority_map_dice"]["value"])
    names = [n for n, _ in H.summary_rows(result)]
    assert names[0].startswith("segment") and any("peak on the named side" in n for n in names)


def test_lesion_side_from_metadata_matches_the_mask_in_ras(evaluated):
    """Left lesions lie at RAS x < midline in every generated brain: catches an LPS/RAS sign slip."""
    _, result = evaluated
    sided = [r["ground"] for r in result["items"] if "side" in r.get("ground", {})]
    assert sided and all(g["lesion_side_agrees"] for g in sided)


def test_side_is_the_same_for_an_lps_and_a_ras_stored_copy():
    arr = np.zeros((20, 10, 10), np.uint8)
    arr[3:6, 4:6, 4:6] = 1  # low i: on an LPS-stored grid that is towards the patient's right
    lps = Volume(arr, (2.0, 2.0, 2.0), (-19.0, -9.0, -9.0), np.eye(3))
    ras = Volume(np.ascontiguousarray(arr[::-1, ::-1]), (2.0, 2.0, 2.0), (19.0, 9.0, -9.0), np.diag([-1.0, -1.0, 1.0]))
    for vol in (lps, ras):
        c = H.centroid_lps(vol, vol.array > 0)
        assert H.side_of(-c[0], 0.0) == "right"
        mid, how = H.midline_x_ras(vol, None, None, np.ones(vol.shape, bool))
        assert how == "body centroid" and mid == pytest.approx(0.0)


def test_query_comes_from_lesion_metadata_and_names_the_side():
    labels = {"lesion_present": 1, "lesion_type": "infarct", "lesion_location": "right superior temporal pole"}
    q = H.lesion_query(labels)
    assert q == "wedge-shaped infarct in the right superior temporal pole"
    assert H.named_side(labels["lesion_location"]) == "right"
    assert H.named_side("L3-L4 intervertebral disc") is None
    assert H.lesion_query({"lesion_present": 0, "lesion_type": "none"}) is None


def _ground(hit, side_ok, dist, centre_dist, study):
    return {"id": study, "study": study, "ground": {"hit": hit, "centre_hit": 0.0, "distance_mm": dist,
                                                     "centre_distance_mm": centre_dist, "side": "left",
                                                     "side_correct": side_ok}}


def test_verdicts_follow_the_interval_against_chance_or_baseline():
    good = [_ground(1.0, 1.0, 5.0 + i, 60.0, f"s{i}") for i in range(12)]
    f = H.figures(good, n_boot=N_BOOT)
    assert f["ground.pointing"]["verdict"] == "above chance"
    assert f["ground.side_correct"]["verdict"] == "above chance"
    assert f["ground.distance_mm"]["verdict"] == "above chance"  # nearer than the centre point: better
    coin = [_ground(0.0, float(i % 2), 80.0 + i, 60.0, f"s{i}") for i in range(12)]
    f = H.figures(coin, n_boot=N_BOOT)
    assert f["ground.side_correct"]["value"] == 0.5 and f["ground.side_correct"]["verdict"] == NOT_DISTINGUISHABLE
    assert f["ground.distance_mm"]["verdict"] == "below chance"  # farther than the centre point


def test_majority_map_baseline_and_dice_per_label_are_exact():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[:5] = 1
    truth[5:7] = 2
    assert H.dice_per_label(truth, truth, 4)[:2] == [1.0, 1.0] and math.isnan(H.dice_per_label(truth, truth, 4)[2])
    pred = np.where(truth == 2, 1, truth).astype(np.uint8)
    assert H.dice_per_label(pred, truth, 3) == pytest.approx([2 * 500 / (700 + 500), 0.0])
    body = 1000
    rec = {"id": "a", "study": "a", "segment": {"dice": [1.0, 1.0], "mean_dice": 1.0, "labels": ["x", "y"],
                                                "truth_in_body": [(500, 500), (200, 200)], "body_voxels": body}}
    f = H.figures([rec, {**rec, "id": "b", "study": "b"}], n_boot=N_BOOT)
    # label x is the majority: the whole body painted x gives Dice 2*500/1500 for x and 0 for y
    assert f["segment.majority_map_dice"]["value"] == pytest.approx((2 * 500 / 1500 + 0.0) / 2)
    assert f["segment.majority_map_dice"]["label"] == "x"


def test_cli_reports_a_bad_row_goes_on_and_prints_no_report_text(bundle, demo_corpus, tmp_path, capsys):
    from decipher_mr.cli import main

    src = Path(demo_corpus)
    lines = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    brains = [r for r in lines if r["body_region"] == "brain"][:3]
    for r in brains:
        for k in ("image", "mask", "regions", "report", "tissue", "region_labels"):
            if r.get(k):
                r[k] = str(src.parent / r[k])
        r["split"] = "test"
    brains[1]["image"] = str(tmp_path / "missing.nii.gz")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in brains) + "{not json\n")
    out = tmp_path / "eval"
    rc = main(["evaluate", "heads", "--bundle", str(bundle), "--manifest", str(manifest), "--split", "test",
               "--out", str(out), "--device", "cpu", "--bootstrap", "100", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0
    result = json.loads((out / "heads.json").read_text(encoding="utf-8"))
    assert result["evaluated"] == 2 and result["rows"] == 3
    fields = {(e["id"], e["field"]) for e in result["errors"]}
    assert (brains[1]["id"], "image") in fields and (None, None) in fields
    assert "missing.nii.gz" in cap.err and "| segment: mean Dice per study |" in cap.out
    md = (out / "heads.md").read_text(encoding="utf-8")
    assert "| segment.mean_dice |" in md
    for r in brains:
        report = Path(r["report"]).read_text(encoding="utf-8")
        for sentence in (s.strip() for s in report.replace("\n", " ").split(".") if len(s.strip()) > 25):
            assert sentence not in cap.out + cap.err + md
