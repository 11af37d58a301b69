"""The retrieval index: build, resume, append and search with the demo bundle; refusals; ANN recall.

The index is built from the real demo corpus manifest (real Colin27/MNI152-based volumes, generated
reports) with the test bundle; a second bundle with other weights must be refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import build_aligned_model, build_test_bundle, shared_test_bundle
from decipher_mr.index import AnnIndex, IndexMismatchError, IndexStoreError, VectorIndex, build_index, exact_search
from decipher_mr.inference import Session

QUERY = "lesion in the left frontal lobe"


@pytest.fixture(scope="module")
def bundle(prepared_demo_cache, tmp_path_factory) -> Path:
    return shared_test_bundle(prepared_demo_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def session(bundle) -> Session:
    return Session.from_bundle(bundle, device="cpu", heads=[])


@pytest.fixture(scope="module")
def rows(demo_corpus) -> list[dict]:
    return [json.loads(line) for line in demo_corpus.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(rows: list[dict], base: Path, dest: Path) -> Path:
    """A manifest at ``dest`` whose relative paths still point into the demo corpus at ``base``."""
    out = []
    for r in rows:
        r = dict(r)
        for key in ("image", "report", "mask", "regions", "tissue", "region_labels", "tissue_labels"):
            if isinstance(r.get(key), str) and not Path(r[key]).is_absolute():
                r[key] = str(base / r[key])
        out.append(r)
    dest.write_text("".join(json.dumps(r) + "\n" for r in out))
    return dest


@pytest.fixture(scope="module")
def built(session, demo_corpus, rows, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    first = write_rows(rows[:5], demo_corpus.parent, out.parent / "first.jsonl")
    summary = build_index(session, first, out, batch=2, progress=False)
    assert summary.added == 5 and not summary.failed
    return out


def test_build_stores_embeddings_and_metadata(built, rows):
    idx = VectorIndex.open(built)
    assert idx.count == 5 and idx.vectors("image").shape == (5, 512)
    assert np.allclose(np.linalg.norm(idx.vectors("image"), axis=1), 1.0, atol=1e-5)
    rec = idx.records[0]
    assert {"id", "study_id", "report", "body_region", "image"} <= set(rec)
    assert rec["id"] == rows[0]["id"] and rec["study_id"] == rows[0]["study_id"] and rec["has_report"]
    assert len(list((built / "segments").glob("*.json"))) == 3  # batches of 2, 2, 1


def test_build_appends_new_rows_without_touching_old_segments(built, session, demo_corpus, rows, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (built / "segments").iterdir()}
    all_rows = write_rows(rows, demo_corpus.parent, tmp_path / "all.jsonl")
    summary = build_index(session, all_rows, built, batch=8, progress=False)
    assert summary.skipped == 5 and summary.added == len(rows) - 5
    after = {p.name: p.stat().st_mtime_ns for p in (built / "segments").iterdir()}
    assert all(after[n] == t for n, t in before.items())
    assert VectorIndex.open(built).count == len(rows)
    again = build_index(session, all_rows, built, progress=False)
    assert again.added == 0 and again.skipped == len(rows)


def test_resume_ignores_an_uncommitted_segment(session, demo_corpus, rows, tmp_path):
    out = tmp_path / "index"
    manifest = write_rows(rows[:3], demo_corpus.parent, tmp_path / "m.jsonl")
    build_index(session, manifest, out, batch=1, progress=False)
    # an interrupted append: arrays written, records (the commit) never were
    (out / "segments" / "000003.image.npy").write_bytes(b"partial")
    idx = VectorIndex.open(out)
    assert idx.count == 3
    more = write_rows(rows[:4], demo_corpus.parent, tmp_path / "m2.jsonl")
    assert build_index(session, more, out, progress=False).added == 1
    assert VectorIndex.open(out).count == 4 and VectorIndex.open(out).vectors("image").shape == (4, 512)


def test_bad_rows_are_reported_and_the_build_goes_on(session, demo_corpus, rows, tmp_path):
    good = [dict(r) for r in rows[:2]]
    broken = {**rows[2], "id": "broken", "image": "images/does-not-exist.nii.gz"}
    manifest = write_rows([good[0], broken, good[1]], demo_corpus.parent, tmp_path / "m.jsonl")
    summary = build_index(session, manifest, tmp_path / "index", progress=False)
    assert summary.added == 2 and len(summary.failed) == 1
    assert "does-not-exist.nii.gz" in summary.failed[0][1]


def test_search_by_volume_finds_the_study_itself_exact_and_approximate(built, session, rows, demo_corpus):
    idx = VectorIndex.open(built)
    target = idx.records[3]
    exact = session.retrieve_cases(target["image"], idx, k=3, exact=True)
    approx = session.retrieve_cases(target["image"], idx, k=3)
    assert exact[0].metadata["id"] == target["id"] and exact[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.metadata["id"] for h in approx] == [h.metadata["id"] for h in exact]
    assert (built / "ann" / "image.faiss").is_file()


def test_search_by_text_ranks_reports_and_images(built, session):
    idx = VectorIndex.open(built)
    for space in ("image", "report"):
        hits = session.search_text(QUERY, idx, k=4, space=space, exact=True)
        assert [h.rank for h in hits] == [1, 2, 3, 4]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    reports = session.retrieve_reports(idx.records[0]["image"], index=idx, k=2)
    assert reports[0].metadata["report"]


def test_an_index_built_with_another_bundle_is_refused(built, prepared_demo_cache, tmp_path):
    other = build_test_bundle(prepared_demo_cache, tmp_path, tasks=(), model=build_aligned_model(seed=7))
    s = Session.from_bundle(other, device="cpu")
    with pytest.raises(IndexMismatchError, match="built with another model bundle"):
        s.retrieve_cases(VectorIndex.open(built).records[0]["image"], built, k=1)
    with pytest.raises(IndexMismatchError):
        build_index(s, built.parent / "first.jsonl", built, progress=False)


def test_a_folder_that_is_not_an_index_is_named(session, tmp_path):
    with pytest.raises(IndexStoreError, match="not a retrieval index"):
        session.search_text(QUERY, tmp_path, k=1)


def test_index_cli_build_and_search(bundle, demo_corpus, rows, tmp_path, capsys):
    from decipher_mr.cli import main

    manifest = write_rows(rows[:3], demo_corpus.parent, tmp_path / "m.jsonl")
    out = tmp_path / "index"
    assert main(["index", "build", "--bundle", str(bundle), "--manifest", str(manifest), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(out), "--text", QUERY, "-k", "2", "--json", str(tmp_path / "hits.json")]) == 0
    printed = capsys.readouterr().out
    assert rows[0]["id"] in printed or rows[1]["id"] in printed or rows[2]["id"] in printed
    hits = json.loads((tmp_path / "hits.json").read_text(encoding="utf-8"))["hits"]
    assert len(hits) == 2 and all("report" in h for h in hits)
    for h in hits:  # report text goes to the file, never to the terminal
        assert h["report"] not in printed
    assert main(["index", "search", str(out), "--volume", str(tmp_path / "missing.nii.gz")]) == 2


def test_approximate_search_recall_on_clustered_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64))
    x = centres[rng.integers(0, 40, 6000)] + 0.35 * rng.normal(size=(6000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(6000, 50, replace=False)] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    ann = AnnIndex.train(x)
    assert ann.nlist > 1  # large enough for IVF cells
    ann.add(x, np.arange(len(x)))
    _, approx = ann.search(q, 10)
    _, exact = exact_search(x, q, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95
