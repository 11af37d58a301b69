"""Model bundles: export, verify, load, and every refusal, on real bundles written to disk.

A tiny aligned model (vit-micro encoder, a 2-layer BERT with MiniLM's tokenizer, 512-d projections)
and a classification head are exported once per module; each refusal test really tampers with a
copy of that bundle (flips a byte, edits the format version, adds a zip-slip entry, swaps weights
for a ``torch.save`` pickle, ...). Inputs are a real MRI crop of Colin27.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from decipher_mr.bundle import BundleError, HeadExport, load_bundle, verify_bundle, write_bundle
from decipher_mr.bundle.writer import write_manifest, zip_folder

REGIONS = ["brain", "knee", "spine"]


@pytest.fixture(scope="module", autouse=True)
def bundle_cache(tmp_path_factory):
    """Per-user bundle cache pointed at a temporary folder for this module."""
    root = tmp_path_factory.mktemp("user_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECIPHER_MR_CACHE", str(root))
        yield root / "bundles"


@pytest.fixture(scope="module")
def colin_crop() -> torch.Tensor:
    """A 32x32x16 crop of the real Colin27 T1, scaled to [0, 1], as (1, 1, X, Y, Z)."""
    import nibabel as nib

    from decipher_mr.assets import colin27_t1

    arr = np.asarray(nib.load(str(colin27_t1())).dataobj, dtype=np.float32)
    crop = arr[74:106, 92:124, 84:100] / 255.0
    return torch.from_numpy(np.ascontiguousarray(crop))[None, None]


@pytest.fixture(scope="module")
def model():
    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(0)
    m = ImageTextModel(build_vision_encoder("vit-micro"), TextTower.from_spec({"tiny": True, "seed": 0}))
    with torch.no_grad():  # non-trivial projections and temperature, so a lost tensor would show
        m.logit_scale.fill_(2.5)
    return m.eval()


@pytest.fixture(scope="module")
def head():
    from decipher_mr.heads import build_head

    torch.manual_seed(1)
    h = build_head("classify", {"embed_dim": 64, "labels": REGIONS})
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return h.eval()


@pytest.fixture(scope="module")
def preprocess():
    from decipher_mr.data.preprocess import PreprocessConfig

    return PreprocessConfig(target_spacing=(3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def bundle_zip(tmp_path_factory, model, head, preprocess) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.zip"
    write_bundle(out, model=model, heads=[HeadExport.from_head("region", head, {"accuracy": 0.75})],
                 preprocess=preprocess, name="tiny-test")
    return out


@pytest.fixture
def bundle_dir(tmp_path, bundle_zip) -> Path:
    """A fresh folder copy of the exported bundle (to tamper with)."""
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(bundle_zip) as zf:
        zf.extractall(folder)  # our own zip, written above
    return folder


def rezip(folder: Path, dest: Path) -> Path:
    zip_folder(folder, dest)
    return dest


def copy_zip_with(src: Path, dest: Path, replace: dict[str, bytes] | None = None,
                  add: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    """Rewrite a zip entry by entry, replacing some contents and appending raw entries."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info.filename)))
        for info, data in add:
            zout.writestr(info, data)
    return dest


def encode_all(m, h, volume, reports):
    with torch.no_grad():
        out = m.vision(volume)
        batch = m.text.tokenize(reports)
        return (m.encode_image(volume), m.encode_text(batch.input_ids, batch.attention_mask), h(out))


# -- export, load, verify ------------------------------------------------------------------------


def test_loaded_zip_bundle_reproduces_the_in_memory_model(bundle_zip, model, head, colin_crop, preprocess):
    reports = ["FINDINGS: No mass. IMPRESSION: Normal brain MRI.", "IMPRESSION: Small lesion in the left lobe."]
    bundle = load_bundle(bundle_zip)
    want = encode_all(model, head, colin_crop, reports)
    got = encode_all(bundle.model, bundle.heads["region"], colin_crop, reports)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    assert torch.equal(bundle.model.logit_scale, model.logit_scale)
    assert [r["name"] for r in bundle.labels["region"]] == REGIONS
    assert [r["index"] for r in bundle.labels["region"]] == [0, 1, 2]
    assert bundle.preprocess == preprocess
    assert bundle.head_specs["region"]["task"] == "classify"
    assert (bundle.tokenizer_dir / "tokenizer.json").is_file()


def test_bundle_holds_safetensors_manifest_and_model_card(bundle_zip):
    with zipfile.ZipFile(bundle_zip) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        card = zf.read("MODEL_CARD.md").decode()
        config = json.loads(zf.read("config.json"))
    assert {"config.json", "MODEL_CARD.md", "vision/encoder.safetensors", "projections.safetensors",
            "text/model.safetensors", "heads/region/head.safetensors", "heads/region/labels.csv"} <= names
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert "not a medical device" in card and "accuracy: 0.75" in card
    assert config["vision"]["patch_size"] == [8, 8, 8] and config["orientation"] == "RAS"
    assert config["preprocess"]["target_spacing"] == [3.0, 3.0, 3.0]


def test_zip_is_extracted_to_the_user_cache_keyed_by_hash_not_the_working_folder(
        bundle_zip, bundle_cache, tmp_path, monkeypatch):
    from decipher_mr.storage import sha256_file

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    bundle = load_bundle(bundle_zip, heads=[])
    assert bundle.folder == bundle_cache / sha256_file(bundle_zip)
    assert list(work.iterdir()) == []
    assert bundle.heads == {}
    assert not [p for p in bundle_cache.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_folder_bundle_loads_like_the_zip(tmp_path, model, head, preprocess, colin_crop):
    out = write_bundle(tmp_path / "bundle", model=model, heads=[HeadExport.from_head("region", head)],
                       preprocess=preprocess)
    bundle = load_bundle(out, heads=["region"])
    assert bundle.folder == out
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(colin_crop), model.encode_image(colin_crop))


def test_image_only_bundle_has_no_text_tower(tmp_path, model, preprocess, colin_crop):
    out = write_bundle(tmp_path / "encoder.zip", vision=model.vision, preprocess=preprocess)
    bundle = load_bundle(out)
    assert bundle.model is None and bundle.tokenizer_dir is None and bundle.heads == {}
    with torch.no_grad():
        assert torch.equal(bundle.vision(colin_crop).cls, model.vision(colin_crop).cls)


def test_interrupted_export_leaves_the_old_bundle_and_no_temporaries(tmp_path, model, head, preprocess):
    out = tmp_path / "model.zip"
    write_bundle(out, vision=model.vision, preprocess=preprocess)
    before = out.read_bytes()
    # a head config that is not JSON fails after the weights were already written
    broken = HeadExport("region", "classify", {"embed_dim": 64, "labels": {"a"}}, head, [{"index": 0, "name": "a"}])
    with pytest.raises(BundleError, match="not JSON-serialisable"):
        write_bundle(out, model=model, heads=[broken], preprocess=preprocess)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "new", model=model, heads=[broken], preprocess=preprocess)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def test_export_refuses_a_head_made_for_another_encoder_width(tmp_path, model, preprocess):
    from decipher_mr.heads import build_head

    wide = build_head("classify", {"embed_dim": 192, "labels": REGIONS})
    with pytest.raises(BundleError, match="192-d encoder"):
        write_bundle(tmp_path / "m.zip", model=model, heads=[HeadExport.from_head("region", wide)],
                     preprocess=preprocess)
    assert not (tmp_path / "m.zip").exists()


def test_export_and_verify_commands_from_training_outputs(tmp_path, model, head, preprocess, capsys):
    from decipher_mr.cli import main
    from decipher_mr.heads import save_head
    from decipher_mr.models.clip import save_image_text_model

    save_image_text_model(model, tmp_path / "align" / "model")
    save_head(head, tmp_path / "heads" / "region" / "head")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text(json.dumps({"format": 1, "preprocess": preprocess.to_json()}))
    out = tmp_path / "model.zip"
    rc = main(["export", "--out", str(out), "--align", str(tmp_path / "align"),
               "--head", f"region={tmp_path / 'heads' / 'region'}", "--preprocess", str(cache)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "format      version 1" in shown and "vit-micro" in shown and "region: classify, 3 labels" in shown
    assert "verify: OK" in shown
    assert main(["verify", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embed_dim"] == 512 and summary["heads"]["region"]["classes"] == 3


@pytest.fixture(scope="module")
def colin_cache(tmp_path_factory) -> Path:
    """A real prepared cache: Colin27 and its skull-stripped copy at 6 mm, one with a report."""
    from decipher_mr.assets import colin27_t1
    from decipher_mr.data.prepare import prepare_manifest
    from decipher_mr.data.preprocess import PreprocessConfig

    root = tmp_path_factory.mktemp("colin_cache")
    rows = [
        {"image": str(colin27_t1("ch2")), "id": "colin", "body_region": "brain", "split": "train",
         "report_text": "FINDINGS: Normal. IMPRESSION: Normal brain."},
        {"image": str(colin27_t1("ch2bet")), "id": "colin-bet", "body_region": "brain", "split": "val"},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare_manifest(root / "manifest.jsonl", root / "cache",
                               config=PreprocessConfig(target_spacing=(6.0, 6.0, 6.0)), progress=False)
    assert not summary.failed
    return root / "cache"


def test_export_reads_the_preprocessing_recorded_by_the_alignment_run(tmp_path, model, colin_cache):
    from decipher_mr.cli import main
    from decipher_mr.models.clip import save_image_text_model
    from decipher_mr.train.checkpoint import save_checkpoint

    run = tmp_path / "align"
    save_image_text_model(model, run / "model")
    save_checkpoint(run / "checkpoints", 5, {"model": model}, trainer_state={"config": {"cache": str(colin_cache)}})
    out = tmp_path / "model.zip"
    assert main(["export", "--out", str(out), "--align", str(run)]) == 0
    bundle = load_bundle(out)
    assert bundle.preprocess.target_spacing == (6.0, 6.0, 6.0)
    card = (bundle.folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "2 prepared series (brain 2; splits train 1, val 1), 1 with a report" in card
    assert "Normal brain" not in card  # report text is patient data


def test_export_config_file_and_flags(tmp_path, model, head, colin_cache, capsys):
    from decipher_mr.cli import main
    from decipher_mr.heads import save_head
    from decipher_mr.models.clip import save_image_text_model

    save_image_text_model(model, tmp_path / "align" / "model")
    save_head(head, tmp_path / "region")
    spec = {"out": str(tmp_path / "from-config"), "align": str(tmp_path / "align"),
            "heads": {"region": str(tmp_path / "region")}, "preprocess": str(colin_cache), "name": "cfg-test"}
    (tmp_path / "export.json").write_text(json.dumps(spec))
    assert main(["export", "--config", str(tmp_path / "export.json")]) == 0
    bundle = load_bundle(tmp_path / "from-config")
    assert bundle.config["name"] == "cfg-test" and bundle.available_heads == ["region"]
    # an encoder other than the aligned one would not match the projections: refused
    capsys.readouterr()
    assert main(["export", "--config", str(tmp_path / "export.json"), "--vision", "vit-micro",
                 "--out", str(tmp_path / "mixed.zip")]) == 1
    assert "differs from the encoder inside the aligned model" in capsys.readouterr().err
    assert not (tmp_path / "mixed.zip").exists()


def test_export_checks_a_head_against_the_encoder_it_was_trained_with(tmp_path, model, head, colin_cache, capsys):
    from safetensors.torch import save_file

    from decipher_mr.cli import main
    from decipher_mr.heads import save_head
    from decipher_mr.models.clip import save_image_text_model
    from decipher_mr.models.vit3d import vision_config

    save_image_text_model(model, tmp_path / "align" / "model")
    base = ["export", "--align", str(tmp_path / "align"), "--preprocess", str(colin_cache)]
    # trained on another architecture
    save_head(head, tmp_path / "other" / "head", extra={"encoder": {"config": vision_config("vit-tiny").to_dict()}})
    assert main([*base, "--out", str(tmp_path / "a.zip"), "--head", f"region={tmp_path / 'other'}"]) == 1
    assert "another encoder architecture" in capsys.readouterr().err
    # trained with a fine-tuned encoder (unfreeze_last): only the very same weights are accepted
    record = {"encoder": {"config": model.vision.config.to_dict(), "weights": "encoder.safetensors"}}
    save_head(head, tmp_path / "tuned" / "head", extra=record)
    tuned = {k: v.detach().clone().contiguous() for k, v in model.vision.state_dict().items()}
    tuned["norm.weight"] += 0.01
    save_file(tuned, str(tmp_path / "tuned" / "encoder.safetensors"))
    assert main([*base, "--out", str(tmp_path / "b.zip"), "--head", f"region={tmp_path / 'tuned'}"]) == 1
    assert "fine-tuned encoder that differs" in capsys.readouterr().err
    save_file({k: v.detach().clone().contiguous() for k, v in model.vision.state_dict().items()},
              str(tmp_path / "tuned" / "encoder.safetensors"))
    assert main([*base, "--out", str(tmp_path / "c.zip"), "--head", f"region={tmp_path / 'tuned'}"]) == 0
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "b.zip").exists()


def test_export_command_without_preprocessing_says_what_to_pass(tmp_path, model, capsys):
    from decipher_mr.cli import main
    from decipher_mr.models.clip import save_image_text_model

    save_image_text_model(model, tmp_path / "align" / "model")
    assert main(["export", "--out", str(tmp_path / "m.zip"), "--align", str(tmp_path / "align")]) == 1
    assert "--preprocess" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


# -- refusals ------------------------------------------------------------------------------------


def test_flipped_byte_is_refused_naming_the_file(bundle_zip, tmp_path, capsys):
    from decipher_mr.cli import main

    with zipfile.ZipFile(bundle_zip) as zf:
        data = bytearray(zf.read("vision/encoder.safetensors"))
    data[-5] ^= 0x01
    bad = copy_zip_with(bundle_zip, tmp_path / "bad.zip", {"vision/encoder.safetensors": bytes(data)})
    with pytest.raises(BundleError, match=r"vision/encoder\.safetensors: checksum mismatch"):
        load_bundle(bad)
    assert main(["verify", str(bad)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_newer_format_version_is_refused(bundle_dir, tmp_path):
    cfg = json.loads((bundle_dir / "config.json").read_text(encoding="utf-8"))
    cfg["format_version"] = 99
    (bundle_dir / "config.json").write_text(json.dumps(cfg))
    write_manifest(bundle_dir)  # a genuine bundle from a newer decipher-mr: checksums all match
    with pytest.raises(BundleError, match=r"config\.json: bundle format version 99 is newer"):
        load_bundle(rezip(bundle_dir, tmp_path / "newer.zip"))


def test_edited_config_without_new_checksums_is_refused(bundle_dir):
    cfg = json.loads((bundle_dir / "config.json").read_text(encoding="utf-8"))
    cfg["heads"]["region"]["task"] = "regress"
    (bundle_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"config\.json: checksum mismatch"):
        load_bundle(bundle_dir)


def _entry(name: str, mode: int = 0o100644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("entry, why", [
    (_entry("../escape.txt"), "escapes the bundle folder"),
    (_entry("heads/../../escape.txt"), "escapes the bundle folder"),
    (_entry("/tmp/absolute.txt"), "absolute path"),
    (_entry("text/link", stat.S_IFLNK | 0o777), "symbolic link"),
])
def test_zip_entries_escaping_the_folder_are_refused(bundle_zip, tmp_path, bundle_cache, entry, why):
    bad = copy_zip_with(bundle_zip, tmp_path / "slip.zip", add=[(entry, b"/etc/passwd")])
    with pytest.raises(BundleError, match=why) as err:
        load_bundle(bad)
    assert entry.filename in str(err.value)
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/absolute.txt").exists()
    from decipher_mr.storage import sha256_file

    assert not (bundle_cache / sha256_file(bad)).exists()


def test_pickled_weights_under_the_safetensors_name_are_refused(bundle_dir, model):
    torch.save(model.vision.state_dict(), bundle_dir / "vision" / "encoder.safetensors")
    write_manifest(bundle_dir)  # checksums match: only the header check can catch it
    with pytest.raises(BundleError, match=r"vision/encoder\.safetensors: not a safetensors file"):
        load_bundle(bundle_dir)


def test_a_pickle_file_in_the_bundle_is_refused(bundle_dir, head, tmp_path):
    torch.save(head.state_dict(), bundle_dir / "heads" / "region" / "head.pt")
    write_manifest(bundle_dir)
    with pytest.raises(BundleError, match=r"heads/region/head\.pt: pickle-format weights are refused"):
        load_bundle(rezip(bundle_dir, tmp_path / "pickle.zip"))


def test_missing_requested_head_is_refused(bundle_zip):
    with pytest.raises(BundleError, match=r"no head 'tumour' \(it holds: region\)"):
        load_bundle(bundle_zip, heads=["tumour"])


def test_file_listed_in_the_manifest_but_missing_is_refused(bundle_dir):
    (bundle_dir / "heads" / "region" / "labels.csv").unlink()
    with pytest.raises(BundleError, match=r"heads/region/labels\.csv: listed in the manifest but missing"):
        load_bundle(bundle_dir)


def test_unlisted_extra_file_is_refused(bundle_dir, tmp_path):
    (bundle_dir / "text" / "notes.txt").write_text("added after export")
    with pytest.raises(BundleError, match=r"text/notes\.txt: not listed in the manifest"):
        load_bundle(rezip(bundle_dir, tmp_path / "extra.zip"))


def test_symlink_in_a_folder_bundle_is_refused(bundle_dir):
    os.symlink("/etc/hostname", bundle_dir / "heads" / "region" / "extra.csv")
    with pytest.raises(BundleError, match=r"extra\.csv: is a symbolic link"):
        load_bundle(bundle_dir)


def test_damaged_cached_extraction_is_replaced_from_the_zip(bundle_zip, model, colin_crop):
    folder = load_bundle(bundle_zip, heads=[]).folder
    weights = folder / "projections.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    bundle = load_bundle(bundle_zip, heads=[])
    assert bundle.folder == folder
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(colin_crop), model.encode_image(colin_crop))
    shutil.rmtree(folder)  # leave the shared cache clean for other tests
