"""The retrieval index: image and report embeddings of indexed studies with their metadata.

>>> from decipher_mr.index import VectorIndex, build_index
>>> build_index(session, "demo/data/manifest.jsonl", "demo/index")
>>> VectorIndex.open("demo/index").search(query[None], k=10, space="image")

See :mod:`decipher_mr.index.ann` for the library choice (faiss) and :mod:`decipher_mr.index.store`
for the on-disk layout.
"""

from decipher_mr.index.ann import AnnIndex, exact_search
from decipher_mr.index.build import BuildSummary, build_index
from decipher_mr.index.store import IndexMismatchError, IndexStoreError, VectorIndex

__all__ = ["AnnIndex", "BuildSummary", "IndexMismatchError", "IndexStoreError", "VectorIndex", "build_index",
           "exact_search"]
