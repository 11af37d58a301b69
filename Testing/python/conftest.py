"""Shared fixtures: a small demo corpus built from real MRI (Colin27, MNI152, AAL) and its prepared cache.

Both are built once per test session in a temporary folder, with fixed seeds, so every test that
needs real anatomy, reports and labels uses the same real files written to disk and read back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_SUBJECTS = 8
DEMO_SEED = 0
# Coarse spacing keeps the session-wide cache small and the tests fast.
TEST_SPACING = (3.0, 3.0, 3.0)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """Path of the manifest of a tiny demo corpus (8 subjects, seed 0)."""
    from decipher_mr.data.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("demo_corpus")
    return Path(build_demo_corpus(out, subjects=DEMO_SUBJECTS, seed=DEMO_SEED, progress=False))


@pytest.fixture(scope="session")
def prepared_demo_cache(demo_corpus, tmp_path_factory) -> Path:
    """Folder of the demo corpus prepared at 3 mm isotropic (read it with PreparedCache)."""
    from decipher_mr.data.prepare import prepare_manifest
    from decipher_mr.data.preprocess import PreprocessConfig

    out = tmp_path_factory.mktemp("demo_cache")
    summary = prepare_manifest(demo_corpus, out, config=PreprocessConfig(target_spacing=TEST_SPACING), progress=False)
    assert not summary.failed, summary.failed
    return out
