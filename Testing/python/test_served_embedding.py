"""One image embedding (issue 14): stage 2 trains on the view that Session serves and evaluation measures.

Real files: the demo corpus built from Colin27/MNI152 and phantoms (conftest), its prepared cache, a tiny
aligned bundle whose model records the 'fit' view, and a real index built from the corpus.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_factory import build_aligned_model, build_test_bundle
from decipher_mr.data.cache import PreparedCache
from decipher_mr.data.io import read_volume
from decipher_mr.data.manifest import read_manifest
from decipher_mr.data.sampling import RegionBatchSampler
from decipher_mr.data.views import check_view, image_view
from decipher_mr.eval.served import evaluate_served
from decipher_mr.eval.stats import NOT_DISTINGUISHABLE, estimate, mean_estimate
from decipher_mr.index import build_index
from decipher_mr.inference import Session
from decipher_mr.train.align_views import image_batch

VIEW = {"mode": "fit", "size": [32, 32, 32]}


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    model = build_aligned_model(seed=3)
    model.image_view = check_view(VIEW)
    return build_test_bundle(prepared_demo_cache, tmp_path_factory.mktemp("served_bundle"), tasks=(), model=model,
                             name="served-view-test")


@pytest.fixture(scope="module")
def session(bundle) -> Session:
    # fp32: the comparison below is about the path, not about bf16 rounding (which differs between
    # thread counts); training and serving share the precision setting ("auto") on a given machine
    return Session.from_bundle(bundle, device="cpu", precision="fp32")


def test_fit_view_holds_the_whole_volume_with_its_proportions(prepared_demo_cache):
    cache = PreparedCache(prepared_demo_cache)
    for i, item in enumerate(cache.items):
        arr = np.asarray(cache.load(i), dtype=np.float32)
        v = image_view(arr, item.spacing, VIEW)
        assert v.shape == (32, 32, 32)
        # the content's bounding box: one scale factor for every axis, the longest axis fills the view
        box = np.ptp(np.array(np.nonzero(np.abs(v) > 0)), axis=1) + 1
        src = np.ptp(np.array(np.nonzero(np.abs(arr) > 0)), axis=1) + 1
        scale = 32 / max(arr.shape)
        assert np.all(np.abs(box - src * scale) <= 2.5), (item.id, box, src * scale)
        assert np.array_equal(v, image_view(arr, item.spacing, VIEW))  # the served view is deterministic
        jittered = image_view(arr, item.spacing, VIEW, np.random.default_rng(i))
        assert jittered.shape == v.shape and not np.array_equal(jittered, v)


def test_served_embedding_is_the_training_view_embedded(session, demo_corpus, prepared_demo_cache):
    """Session.image_embedding(file) == the model on image_batch's eval view of the prepared cache item."""
    cache = PreparedCache(prepared_demo_cache)
    rows = {r.id: r for r in read_manifest(demo_corpus)}
    model = session.model
    for i, item in enumerate(cache.items[:4]):
        served = session.image_embedding(rows[item.id].image)
        view = image_batch(cache, [i], {**VIEW, "augment": True}, rng=None)
        with torch.inference_mode():
            trained = model.encode_image(view)[0]
        assert float(torch.dot(served, trained)) > 0.99999, item.id
    # and the old path (pooling the whole volume's tokens) is *not* what is served
    enc = session.encode(rows[cache.items[0].id].image)
    pooled = torch.cat([enc.cls, enc.patch_tokens.mean(0)])[None]
    with torch.inference_mode():
        old = model.project_image(pooled)[0]
    assert float(torch.dot(old, session.image_embedding(enc))) < 0.9999


def test_served_embedding_runs_no_dense_encoding(bundle, demo_corpus):
    """The view needs only the prepared array: an index build or *Reports like this volume* on a volume
    nobody segmented runs one small view pass, not the sliding-window encoder; a later dense pass (for a
    head) reuses the embedding, and a session that encoded first serves the same vector."""
    row = read_manifest(demo_corpus)[0]
    s = Session.from_bundle(bundle, device="cpu", precision="fp32")
    first = s.image_embedding(row.image)
    assert s.stats["encoder_passes"] == 0 and s.stats["view_passes"] == 1
    assert torch.equal(s.image_embedding(read_volume(row.image)), first) and s.stats["view_passes"] == 1
    enc = s.encode(row.image)
    assert s.stats["encoder_passes"] == 1 and torch.equal(s.image_embedding(enc), first)
    assert s.stats["view_passes"] == 1
    t = Session.from_bundle(bundle, device="cpu", precision="fp32")
    t.encode(row.image)
    assert torch.allclose(t.image_embedding(row.image), first, atol=1e-6)
    assert t.stats["encoder_passes"] == 1 and t.stats["view_passes"] == 1


def test_bundle_evaluation_and_its_index_search_agree(session, demo_corpus, tmp_path):
    """evaluate_served's image→report ranking is the ranking the index's own search returns."""
    index = tmp_path / "index"
    summary = build_index(session, demo_corpus, index, batch=4, progress=False)
    assert summary.added == 8 and not summary.failed
    result = evaluate_served(session, demo_corpus, "train", index=index, progress=False)
    rows = [r for r in read_manifest(demo_corpus) if r.split == "train"]
    assert result["n"] == len(rows) >= 4
    img = torch.stack([session.image_embedding(r.image) for r in rows])
    txt = session.embed_reports([Path(r.report).read_text(encoding="utf-8") for r in rows])
    ids = [r.id for r in rows]
    for i, row in enumerate(rows):
        hits = session.retrieve_reports(row.image, index=index, k=8, exact=True)
        from_index = [h.metadata["id"] for h in hits if h.metadata["id"] in ids]
        from_eval = [ids[j] for j in torch.argsort(txt @ img[i], descending=True, stable=True).tolist()]
        assert from_index == from_eval, (row.id, from_index, from_eval)
    figs = result["figures"]
    for name in ("image→report R@1", "Reports like this volume: body-region precision@5 (index)",
                 "zero-shot body region (balanced accuracy)"):
        e = figs[name]
        assert e["n"] > 0 and e["ci"][0] <= e["value"] <= e["ci"][1] and e["chance"] is not None, (name, e)


def test_mixed_fraction_batches(monkeypatch):
    regions = ["brain"] * 40 + ["knee"] * 12 + ["spine"] * 12 + ["abdomen"] * 12
    for frac in (0.0, 0.5, 1.0):
        s = RegionBatchSampler(regions, batch_size=8, seed=1, mixed_fraction=frac)
        for epoch in range(3):
            batches = s.global_batches(epoch)
            assert len(batches) == s.batches_per_epoch()
            seen = Counter(int(i) for b in batches for i in b)
            assert set(seen) == set(range(len(regions)))  # every item every epoch
            kinds = [len({regions[int(i)] for i in b}) for b in batches]
            mixed_items = sum(len(b) for b, k in zip(batches, kinds) if k > 1)
            if frac == 0.0:
                assert max(kinds) == 1
            else:
                assert max(kinds) > 1
                # the mixed share of items is the configured one (padding of last batches aside)
                assert abs(mixed_items / len(regions) - frac) <= 0.25, (frac, mixed_items)
    with pytest.raises(ValueError, match="mixed_fraction"):
        RegionBatchSampler(regions, 8, mixed_fraction=1.5)


def test_intervals_and_the_chance_verdict():
    rng = np.random.default_rng(0)
    groups = [f"s{i // 2}" for i in range(60)]  # two series per study
    good = mean_estimate((rng.random(60) < 0.9).astype(float), groups, chance=0.25)
    assert good["verdict"] == "above chance" and good["ci"][0] > 0.25 and good["studies"] == 30
    coin = mean_estimate((rng.random(60) < 0.5).astype(float), groups, chance=0.5)
    assert coin["verdict"] == NOT_DISTINGUISHABLE and coin["ci"][0] < 0.5 < coin["ci"][1]
    # resampling is by study: a draw holds both series of a study or neither
    sizes = set()
    estimate(lambda idx: sizes.add(len(idx)) or 0.0, groups, n_boot=50)
    assert sizes and all(n % 2 == 0 for n in sizes)


def test_projection_keeps_small_feature_differences_under_bf16_autocast():
    """Pooled features of different volumes share a large common part (measured on the demo model: every
    bf16 image embedding was identical). Standardised, fp32 projections keep the differences."""
    model = build_aligned_model(seed=0)
    width = model.image_proj.in_features
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(width, generator=gen) * 50
    pooled = common + 0.02 * torch.randn(8, width, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model.project_image(pooled).float()
    model.set_feature_statistics(pooled, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model.project_image(pooled).float()
    off = ~torch.eye(8, dtype=torch.bool)
    assert float((before @ before.T)[off].mean()) > 0.999  # the failure this guards against
    assert float((after @ after.T)[off].mean()) < 0.5
    torch.testing.assert_close(model.image_center, pooled.mean(0))
