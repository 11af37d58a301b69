"""Head metrics, the `evaluate heads` report and the SegResNet-from-scratch comparison.

Metrics are checked on real AAL masks (exact answers: identical masks, disjoint masks, shifted
boxes); the report and the comparison run end to end on the demo corpus through the CLI.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from decipher_mr.assets import aal_atlas
from decipher_mr.eval import head_metrics as M
from decipher_mr.heads.dense import box_from_mask, box_iou


@pytest.fixture(scope="module")
def aal_small() -> np.ndarray:
    """The real AAL atlas at 4 mm (nearest neighbour by striding)."""
    return np.asarray(nib.load(str(aal_atlas())).dataobj)[::4, ::4, ::4].astype(np.int64)


def test_dice_is_one_for_identical_masks_and_hd95_zero(aal_small):
    lab = (aal_small == 1).astype(np.int64) + 2 * (aal_small == 2)
    m = M.dice_hd95(lab, lab, 3, spacing=(4, 4, 4))
    assert m["dice"] == pytest.approx([1.0, 1.0])
    assert m["hd95"] == pytest.approx([0.0, 0.0])


def test_dice_is_zero_and_hd95_in_mm_for_left_vs_right_precentral(aal_small):
    left, right = (aal_small == 1).astype(np.int64), (aal_small == 2).astype(np.int64)
    m = M.dice_hd95(left, right, 2, spacing=(4, 4, 4))
    assert m["dice"] == [0.0]
    assert m["hd95"][0] > 20  # the two precentral gyri lie centimetres apart


def test_box_iou_of_a_region_with_itself_and_a_shifted_copy(aal_small):
    box = box_from_mask(aal_small == 1)
    assert box_iou(box, box) == 1.0
    shifted = [box[0] + 1, *box[1:3], box[3] + 1, *box[4:]]
    width = box[3] - box[0]
    assert box_iou(box, shifted) == pytest.approx((width - 1) / (width + 1))


def test_pointing_and_heatmap_iou_on_a_real_region(aal_small):
    mask = aal_small == 7
    centre = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    assert M.pointing_hit(centre, mask) == 1.0
    assert M.heatmap_iou(mask.astype(np.float32), mask) == 1.0
    assert M.heatmap_iou(np.zeros(mask.shape), mask) == 0.0


def test_auroc_and_classification_metrics_on_known_answers():
    assert M.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc(np.array([0.1, 0.2]), np.array([0, 0])))
    m = M.classification_metrics(torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]]), [0, 1, 1], ["a", "b"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["auroc"] == pytest.approx(0.75)


def test_voxel_auroc_only_counts_voxels_inside_the_body():
    lesion = np.zeros((8, 8, 8), bool)
    lesion[3:5, 3:5, 3:5] = True
    body = np.zeros_like(lesion)
    body[1:7, 1:7, 1:7] = True
    amap = np.where(lesion, 0.6, 0.1).astype(np.float32)
    amap[~body] = 0.9  # bright air outside the body must not count against the map
    assert M.voxel_auroc([amap], [lesion], [body]) == 1.0


def test_evaluate_heads_cli_writes_report_and_compares_with_segresnet(prepared_demo_cache, tmp_path, capsys):
    from decipher_mr.cli import main
    from decipher_mr.train.heads import HEAD_DEFAULTS, train_head

    run = tmp_path / "segment"
    train_head({**HEAD_DEFAULTS, "task": "segment", "cache": str(prepared_demo_cache), "output": str(run),
                "where": {"body_region": "brain"}, "iterations": 4, "eval_every": 2, "batch_size": 1, "lr": 3e-3,
                "progress": False, "head": {"crop": [40, 48, 40], "channels": 4, "layers": [1, 2, 2],
                                            "groups": {"frontal lobe": ["Frontal_*", "Precentral_*"]}}})
    out = tmp_path / "report"
    rc = main(["evaluate", "heads", "--run", str(run), "--cache", str(prepared_demo_cache), "--split", "val", "test",
               "--baseline-budget", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "SegResNet" in printed and "time to reach SegResNet's final Dice" in printed
    data = json.loads((out / "heads.json").read_text(encoding="utf-8"))
    assert data["results"][0]["task"] == "segment" and "dice" in data["results"][0]["metrics"]
    assert data["comparison"]["baseline"]["history"], "the baseline curve is recorded"
    md = (out / "heads.md").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("overlay-") for p in pngs) and any(p.startswith("curve-") for p in pngs)
    assert all(f"]({p})" in md for p in pngs)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_evaluate_heads_names_a_run_that_is_not_a_head(prepared_demo_cache, tmp_path, capsys):
    from decipher_mr.cli import main

    rc = main(["evaluate", "heads", "--run", str(tmp_path), "--cache", str(prepared_demo_cache), "--no-baseline"])
    assert rc == 2
    assert str(tmp_path) in capsys.readouterr().err
