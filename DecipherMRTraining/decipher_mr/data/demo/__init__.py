"""The offline demo corpus: real brain templates (Colin27, MNI152, AAL) turned into many augmented
subjects, plus procedural knee/spine/abdomen phantoms, synthetic lesions and generated reports.

>>> from decipher_mr.data.demo import build_demo_corpus
>>> manifest = build_demo_corpus("demo/data", subjects=8, seed=0)
"""

from .corpus import DEFAULT_SUBJECTS, build_demo_corpus, plan_corpus, region_counts, summarize

__all__ = ["DEFAULT_SUBJECTS", "build_demo_corpus", "plan_corpus", "region_counts", "summarize"]
