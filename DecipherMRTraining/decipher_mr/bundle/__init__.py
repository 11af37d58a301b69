"""Model bundles: one folder or zip holding a trained DecipherMR model, verified before use.

>>> from decipher_mr.bundle import write_bundle, load_bundle, verify_bundle
>>> write_bundle("model.zip", model=aligned, heads=[head], preprocess=PreprocessConfig())
>>> bundle = load_bundle("model.zip", heads=["tissue"])
"""

from decipher_mr.bundle.format import FORMAT_VERSION, BundleError
from decipher_mr.bundle.reader import Bundle, load_bundle, verify_bundle
from decipher_mr.bundle.writer import HeadExport, write_bundle

__all__ = ["FORMAT_VERSION", "Bundle", "BundleError", "HeadExport", "load_bundle", "verify_bundle", "write_bundle"]
