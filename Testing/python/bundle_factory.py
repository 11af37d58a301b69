"""A small, real model bundle for inference tests (engine, worker, index, Slicer module).

The aligned model is tiny (vit-micro encoder, a 2-layer BERT with MiniLM's tokenizer, 512-d
projections) with fixed seeds; its heads are trained by the real head-training loop
(:func:`decipher_mr.train.heads.train_head`) for a couple of iterations on the prepared demo cache,
so they are genuine trained heads (segmentation of AAL lobes, supervised lesion anomaly, text
grounding, lobe localization, body-region classification), just not good ones. Nothing is mocked.

>>> from bundle_factory import build_test_bundle
>>> bundle = build_test_bundle(prepared_demo_cache, tmp_path)      # ~15 s on two CPU cores
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

TASKS = ("segment", "anomaly", "ground", "localize", "classify")
# Small views keep training and decoding fast; the sliding-window paths still run on larger volumes.
HEAD_OVERRIDES = {
    "segment": {"crop": [48, 48, 48], "channels": 8},
    "anomaly": {"crop": [48, 48, 48], "channels": 8},
    "ground": {"crop": [48, 48, 48]},
    "localize": {"crop": [48, 48, 48]},
    "classify": {},
}
HEAD_NAMES = {"segment": "lobes", "anomaly": "lesion", "ground": "grounding", "localize": "lobe-boxes",
              "classify": "region"}
TEST_SPACING = (3.0, 3.0, 3.0)


def build_aligned_model(seed: int = 0):
    """The tiny aligned image-text model (random weights from ``seed``)."""
    import torch

    from decipher_mr.models.clip import ImageTextModel
    from decipher_mr.models.text import TextTower
    from decipher_mr.models.vit3d import build_vision_encoder

    torch.manual_seed(seed)
    model = ImageTextModel(build_vision_encoder("vit-micro"), TextTower.from_spec({"tiny": True, "seed": seed}))
    return model.eval()


def build_test_bundle(cache: Path, work: Path, tasks: Sequence[str] = TASKS, iterations: int = 2, seed: int = 0,
                      name: str = "tiny-inference-test", model=None) -> Path:
    """Train ``tasks`` heads on ``cache`` and export them with the aligned model as a folder bundle.

    Returns the bundle folder (``work/bundle``). Pass another ``seed`` (or ``model``) for a bundle
    whose embeddings differ (e.g. to test that an index refuses it).
    """
    from decipher_mr.bundle import HeadExport, write_bundle
    from decipher_mr.data.preprocess import PreprocessConfig
    from decipher_mr.heads import load_head
    from decipher_mr.models.clip import save_image_text_model
    from decipher_mr.train.heads import HEAD_DEFAULTS, train_head

    work = Path(work)
    model = model if model is not None else build_aligned_model(seed)
    aligned = work / "aligned"
    save_image_text_model(model, aligned)
    exports = []
    for task in tasks:
        run = work / "heads" / task
        train_head({**HEAD_DEFAULTS, "task": task, "cache": str(cache), "output": str(run),
                    "encoder": {"aligned": str(aligned)}, "head": dict(HEAD_OVERRIDES[task]),
                    "where": {} if task == "classify" else {"body_region": "brain"},
                    "iterations": iterations, "eval_every": iterations, "val_split": "__no_validation__",
                    "warmup_iterations": 0, "seed": seed, "progress": False, "feature_store": False})
        head, _ = load_head(run / "head")
        exports.append(HeadExport.from_head(HEAD_NAMES[task], head))
    out = work / "bundle"
    write_bundle(out, model=model, heads=exports, preprocess=PreprocessConfig(target_spacing=TEST_SPACING), name=name)
    return out


_BUILT: dict[tuple[str, int], Path] = {}


def shared_test_bundle(cache: Path, tmp_path_factory, seed: int = 0) -> Path:
    """:func:`build_test_bundle` once per test process (several test modules share one bundle).

    >>> @pytest.fixture(scope="module")
    ... def bundle(prepared_demo_cache, tmp_path_factory):
    ...     return shared_test_bundle(prepared_demo_cache, tmp_path_factory)
    """
    key = (str(cache), seed)
    if key not in _BUILT or not _BUILT[key].is_dir():
        _BUILT[key] = build_test_bundle(cache, tmp_path_factory.mktemp(f"test_bundle_{seed}"), seed=seed)
    return _BUILT[key]
