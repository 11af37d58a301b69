"""The inference engine: one session holds a bundle, encodes each volume once, and answers
segmentation, anomaly, text-grounding, localization and retrieval requests in the input's geometry.

>>> from decipher_mr.inference import Session
>>> s = Session.from_bundle("model.zip")
>>> s.ground("t1.nii.gz", "left frontal lobe").heatmap      # a Volume on the input's grid

The names below are imported on first use (PEP 562): importing this package, or its torch-free
``decipher_mr.inference.client`` from 3D Slicer's GUI process, must not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# exported name -> submodule that defines it
_EXPORTS = {
    "Cancelled": "errors", "InferenceError": "errors", "QueryError": "errors",
    "EncodedVolume": "encoding", "TokenCache": "encoding", "volume_content_hash": "encoding",
    "HeatmapResult": "results", "LocalizationResult": "results", "RetrievalHit": "results",
    "SegmentationResult": "results",
    "Session": "session", "as_volume": "runtime", "bundle_fingerprint": "runtime", "resolve_device": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule the first time it is asked for.

    >>> import decipher_mr.inference as inference; inference.QueryError     # loads errors.py only
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
