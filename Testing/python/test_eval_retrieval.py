"""Retrieval metrics, zero-shot prompts and the `decipher-mr evaluate retrieval` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brain_pairs import build_brain_pairs
from decipher_mr.cli import main as cli_main
from decipher_mr.data.cache import CacheItem
from decipher_mr.eval.retrieval import (chance_recall, partner_ranks, region_retrieval_top_k, report_keys,
                                         retrieval_metrics)
from decipher_mr.eval.zero_shot import classify, lesion_task, roc_auc
from decipher_mr.models.text import TextTower


def test_perfect_pairs_rank_first_and_constant_embeddings_rank_last():
    emb = torch.eye(12)
    m = retrieval_metrics(emb, emb)
    assert m["image_to_report"]["R@1"] == 1.0 and m["report_to_image"]["median_rank"] == 1.0
    const = F.normalize(torch.ones(12, 4), dim=-1)
    assert (partner_ranks(const @ const.T) == 12).all()  # ties never help the query
    assert retrieval_metrics(const, const)["image_to_report"]["R@10"] == 0.0
    assert m["chance"]["R@10"] == pytest.approx(10 / 12)


def test_identical_reports_are_one_answer_and_chance_counts_them():
    """Templated reports (the same normal report for many studies) are common: a twin of the own report
    is a right answer, not a miss, and chance rises with the number of twins."""
    keys = report_keys(["IMPRESSION: normal.", "IMPRESSION:  normal.", "IMPRESSION: normal.", "a", "b", "c"])
    assert keys[0] == keys[1] == keys[2] and len(set(keys)) == 4
    emb = torch.eye(6)[[0, 0, 0, 3, 4, 5]]  # each image matches its report exactly; the twins are one point
    fair = retrieval_metrics(emb, emb, ks=(1,), keys=keys)
    assert fair["image_to_report"]["R@1"] == 1.0 and fair["report_to_image"]["R@1"] == 1.0
    assert fair["n"]["distinct_reports"] == 4
    # without keys the twins tie with the own report and count against it
    assert retrieval_metrics(emb, emb, ks=(1,))["image_to_report"]["R@1"] == 0.5
    # a random ranking of 6 puts one of 3 twins first with p 1/2, a unique report with p 1/6
    assert fair["chance"]["R@1"] == pytest.approx((3 * 0.5 + 3 / 6) / 6)
    assert chance_recall(10, [3], 2) == pytest.approx(1 - 21 / 45)
    const = F.normalize(torch.ones(6, 4), dim=-1)  # a constant model stays at or below chance
    assert retrieval_metrics(const, const, ks=(1,), keys=keys)["image_to_report"]["R@1"] == 0.0


def test_recall_at_k_counts_partner_within_k():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.1], [0.3, 0.2, 0.1]])
    assert partner_ranks(sim).tolist() == [1, 2, 3]


def test_region_top3_counts_queries_with_their_region_in_the_top3():
    img = torch.eye(4)
    txt = torch.eye(4)[[1, 0, 3, 2]]  # every query's best match is its neighbour
    regions = ["brain", "brain", "knee", "knee"]
    assert region_retrieval_top_k(img, txt, regions, k=1)["image_to_report"] == 1.0
    assert region_retrieval_top_k(img, txt, ["brain", "knee", "brain", "knee"], k=1)["image_to_report"] == 0.0


def test_roc_auc_of_separable_and_tied_scores():
    assert roc_auc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5


@pytest.fixture(scope="module")
def minilm() -> TextTower:
    return TextTower.from_spec(None)


def test_zero_shot_picks_the_prompt_of_each_class(minilm):
    encode = lambda texts: F.normalize(minilm.encode(texts), dim=-1)  # noqa: E731
    prompts = {"brain": ["MRI of the brain"], "knee": ["MRI of the knee"]}
    images = encode(["MRI of the knee", "MRI of the brain", "MRI of the knee"])
    result = classify(images, ["knee", "brain", "knee"], prompts, encode)
    assert result["accuracy"] == 1.0 and result["chance_accuracy"] == 0.5


def test_lesion_task_scores_located_lesions_against_normal(minilm):
    encode = lambda texts: F.normalize(minilm.encode(texts), dim=-1)  # noqa: E731
    items = [CacheItem(id=str(n), array="", shape=(1, 1, 1), spacing=(1, 1, 1), labels=labels) for n, labels in enumerate([
        {"lesion": True, "lesion_location": "left frontal lobe"},
        {"lesion": True, "lesion_location": "right occipital lobe"},
        {"lesion": False}, {"lesion": False}])]
    images = encode(["lesion in the left frontal lobe", "lesion in the right occipital lobe", "normal study",
                     "no focal lesion, normal MRI"])
    result = lesion_task(images, items, encode)
    assert result["auc"] == 1.0 and result["positives"] == 2


def test_evaluate_retrieval_command_writes_json_and_markdown_without_report_text(tmp_path, capsys):
    cache = build_brain_pairs(tmp_path / "pairs", n_train=12, n_val=2, n_test=12)
    run = tmp_path / "run"
    code = cli_main(["align", f"cache={cache}", f"output={run}", "iterations=3", "batch_size=4", "progress=false",
                     'vision={"preset": "vit-micro"}', 'text={"tiny": true}', "image.size=[32,40,32]",
                     'image.mode="resize"'])
    assert code == 0
    capsys.readouterr()
    assert cli_main(["evaluate", "retrieval", "--checkpoint", str(run), "--cache", str(cache), "--no-progress"]) == 0
    printed = capsys.readouterr()
    result = json.loads((run / "eval-test" / "retrieval.json").read_text(encoding="utf-8"))
    md = (run / "eval-test" / "retrieval.md").read_text(encoding="utf-8")
    assert result["n"] == 12 and set(result["retrieval"]) >= {"image_to_report", "report_to_image", "chance"}
    assert {"R@1", "R@5", "R@10", "median_rank"} <= set(result["retrieval"]["image_to_report"])
    assert result["zero_shot"]["sequence"]["classes"] == ["T1", "T2"]
    assert "auc" in result["zero_shot"]["lesion"]
    assert "R@10" in md and "Zero-shot" in md
    for text in (md, printed.out, printed.err, json.dumps(result)):
        assert "mm lesion in the" not in text and "CLINICAL HISTORY" not in text


def test_evaluate_retrieval_names_a_missing_model(tmp_path, capsys):
    assert cli_main(["evaluate", "retrieval", "--checkpoint", str(tmp_path / "none"), "--cache", str(tmp_path)]) == 2
    assert "none" in capsys.readouterr().err


def test_align_and_evaluate_run_on_the_prepared_demo_corpus(prepared_demo_cache, tmp_path):
    run = tmp_path / "demo-run"
    code = cli_main(["align", "--config", str(Path(__file__).parents[2] / "DecipherMRTraining/configs/align-demo.json"),
                     f"cache={prepared_demo_cache}", f"output={run}", "iterations=2", "batch_size=2", "progress=false",
                     'vision={"preset": "vit-micro"}', 'text={"tiny": true}', "image.size=[32,32,32]"])
    assert code == 0
    assert cli_main(["evaluate", "retrieval", "--checkpoint", str(run), "--cache", str(prepared_demo_cache),
                     "--no-progress"]) == 0
    result = json.loads((run / "eval-test" / "retrieval.json").read_text(encoding="utf-8"))
    assert result["zero_shot"]["body_region"]["classes"] == ["brain", "knee"]
    assert 0.0 <= result["body_region_top3"]["image_to_report"] <= 1.0
