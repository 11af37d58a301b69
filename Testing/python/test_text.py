"""The text tower: loading local folders with clear errors, report-aware truncation, MLM pretraining."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brain_pairs import build_brain_pairs
from decipher_mr.assets import minilm_text_encoder
from decipher_mr.models.text import (
    TextTower,
    TextTowerError,
    load_text_backbone,
    load_tokenizer,
    split_sections,
    tokenize_reports,
)
from decipher_mr.train.mlm import MLM_DEFAULTS, mask_tokens, train_mlm
from decipher_mr.train.run_config import load_run_config


@pytest.fixture(scope="module")
def pairs_cache(tmp_path_factory) -> Path:
    return build_brain_pairs(tmp_path_factory.mktemp("pairs"), n_train=24, n_val=8, n_test=4)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(minilm_text_encoder())


def _copy_folder(src: Path, dest: Path, skip: set[str]) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            # the weights are 90 MB: link rather than copy
            (dest / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dest / f.name)
    return dest


def test_folder_without_weights_is_refused_naming_the_file(tmp_path):
    folder = _copy_folder(minilm_text_encoder(), tmp_path / "noweights", {"model.safetensors"})
    with pytest.raises(TextTowerError, match=r"noweights.*model\.safetensors"):
        load_text_backbone(folder)


def test_folder_without_tokenizer_or_config_is_refused(tmp_path):
    folder = _copy_folder(minilm_text_encoder(), tmp_path / "notok", {"tokenizer.json", "vocab.txt"})
    with pytest.raises(TextTowerError, match="tokenizer"):
        load_text_backbone(folder)
    folder = _copy_folder(minilm_text_encoder(), tmp_path / "nocfg", {"config.json"})
    with pytest.raises(TextTowerError, match="config.json"):
        load_text_backbone(folder)


def test_tokenizer_that_does_not_match_the_model_is_refused(tmp_path):
    folder = _copy_folder(minilm_text_encoder(), tmp_path / "mismatch", set())
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["vocab_size"] = 50265  # a RoBERTa-sized embedding table next to BERT's 30,522-token vocabulary
    os.remove(folder / "config.json")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TextTowerError, match="tokenizer does not match the model"):
        load_text_backbone(folder)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(TextTowerError, match="does not exist"):
        load_text_backbone(tmp_path / "nowhere")


def test_sections_are_found_in_a_one_line_report():
    heads = [h for h, _ in split_sections("HISTORY: fall. TECHNIQUE: T1. FINDINGS: normal. IMPRESSION: none.")]
    assert heads == ["HISTORY", "TECHNIQUE", "FINDINGS", "IMPRESSION"]


def test_long_report_keeps_impression_and_drops_history_first(minilm_tokenizer):
    report = ("CLINICAL HISTORY: " + "prior surgery and chronic headache. " * 30
              + "TECHNIQUE: sagittal T1 and axial T2. "
              + "FINDINGS: " + "the ventricles are normal. " * 120 + "the final finding is a cyst. "
              + "IMPRESSION: lesion in the left frontal lobe.")
    ids = tokenize_reports(minilm_tokenizer, [report], max_length=512)[0]
    assert len(ids) == 512
    text = minilm_tokenizer.decode(ids)
    assert "impression : lesion in the left frontal lobe." in text
    assert "surgery" not in text and "sagittal" not in text
    # findings trimmed from the middle: its start and its last sentence survive around "..."
    assert "findings : the ventricles" in text and "the final finding is a cyst" in text and "..." in text


def test_short_report_is_not_changed(minilm_tokenizer):
    report = "HISTORY: fall. FINDINGS: normal. IMPRESSION: normal study."
    ids = tokenize_reports(minilm_tokenizer, [report])[0]
    assert minilm_tokenizer.decode(ids[1:-1]) == "history : fall. findings : normal. impression : normal study."


def test_impression_alone_over_the_limit_is_cut_at_its_end(minilm_tokenizer):
    report = "FINDINGS: normal. IMPRESSION: " + "word " * 100
    ids = tokenize_reports(minilm_tokenizer, [report], max_length=32)[0]
    assert len(ids) == 32 and ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id


def test_minilm_encodes_reports_batched_like_one_by_one():
    tower = TextTower.from_spec(None)
    reports = ["FINDINGS: normal. IMPRESSION: normal study.",
               "FINDINGS: There is a 12 mm lesion in the left frontal lobe. IMPRESSION: lesion."]
    together = tower.encode(reports, batch_size=2)
    alone = torch.cat([tower.encode([r]) for r in reports])
    assert together.shape == (2, 384)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_bert_masking_targets_only_real_tokens(minilm_tokenizer):
    ids = tokenize_reports(minilm_tokenizer, ["FINDINGS: normal brain. IMPRESSION: normal study."] * 64)
    batch = torch.tensor(ids)
    masked, labels = mask_tokens(batch, torch.ones_like(batch), minilm_tokenizer, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # never [CLS]/[SEP]
    assert 0.08 < chosen.float().mean() < 0.25
    assert (masked[chosen] == minilm_tokenizer.mask_token_id).float().mean() > 0.6


def test_pretrain_text_lowers_perplexity_and_resumes_from_its_checkpoint(pairs_cache, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"cache={pairs_cache}", f"output={out}", "iterations=16", "checkpoint_every=8", "progress=false"]
    cfg = load_run_config(Path(__file__).parents[2] / "DecipherMRTraining/configs/text-tiny.json", MLM_DEFAULTS, overrides)
    first = train_mlm(cfg)
    assert first["perplexity_after"] < first["perplexity_before"]
    err = capsys.readouterr().err
    assert "perplexity before" in err and "perplexity after" in err
    assert "lesion in the" not in err  # report text is never printed
    ckpt = out / "checkpoints" / "ckpt-00000016"
    saved = load_file(str(ckpt / "weights.safetensors"))
    assert (ckpt / "text_encoder" / "tokenizer.json").exists()

    # the same command again: resumes at iteration 16 with the trained weights, trains nothing more
    second = train_mlm(load_run_config(Path(__file__).parents[2] / "DecipherMRTraining/configs/text-tiny.json",
                                       MLM_DEFAULTS, overrides))
    assert second["start_iteration"] == 16
    assert "resumed from" in capsys.readouterr().err
    model, _, _ = load_text_backbone(out / "text_encoder", masked_lm=True)
    exported = model.state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(exported[key], saved[f"text.{key}"])
    fresh, _, _ = load_text_backbone({"tiny": True}, masked_lm=True)
    assert not torch.equal(fresh.state_dict()[key], saved[f"text.{key}"])
