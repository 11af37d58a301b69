"""The inference engine: one session holds a bundle, encodes each volume once, and answers
segmentation, anomaly, text-grounding, localization and retrieval requests in the input's geometry.

>>> from decipher_mr.inference import Session
>>> s = Session.from_bundle("model.zip")
>>> s.ground("t1.nii.gz", "left frontal lobe").heatmap      # a Volume on the input's grid
"""

from decipher_mr.inference.encoding import EncodedVolume, TokenCache, volume_content_hash
from decipher_mr.inference.errors import Cancelled, InferenceError, QueryError
from decipher_mr.inference.results import HeatmapResult, LocalizationResult, RetrievalHit, SegmentationResult
from decipher_mr.inference.session import Session, as_volume, bundle_fingerprint, resolve_device

__all__ = ["Cancelled", "EncodedVolume", "HeatmapResult", "InferenceError", "LocalizationResult", "QueryError",
           "RetrievalHit", "SegmentationResult", "Session", "TokenCache", "as_volume", "bundle_fingerprint",
           "resolve_device", "volume_content_hash"]
