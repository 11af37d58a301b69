"""The demo corpus: plan the subjects, build them, write the manifest, label tables and README.

Layout of a corpus folder::

    DIR/manifest.jsonl                 one JSON object per series (the project's manifest contract)
    DIR/images/<id>.nii.gz             int16 MRI-like image
    DIR/masks/<id>_lesion.nii.gz       uint8 lesion mask (all zero for normal studies)
    DIR/regions/<id>_regions.nii.gz    AAL labels (brain) or tissue labels (knee, spine, abdomen)
    DIR/regions/<set>_labels.csv       value,name for aal / knee / spine / abdomen
    DIR/tissue/<id>_tissue.nii.gz      CSF/GM/WM/head tissue labels of brain subjects
    DIR/tissue/tissue_labels.csv       value,name of the tissue table shared by all regions
    DIR/reports/<id>.txt               generated FINDINGS / IMPRESSION report
    DIR/README.md                      what is real and what is generated

For knee, spine and abdomen the regions *are* the tissue labels, so their rows' ``tissue`` key
points at the regions file. Every row also records ``region_labels``, ``tissue_labels``,
``source_anatomy`` and ``acquisition`` (plane, orientation code, spacing, slice thickness, shape).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .contrast import TISSUES
from .lesions import lesion_types_for
from .subject import SubjectPlan, build_subject

DEFAULT_SUBJECTS = 48
REGIONS = ("brain", "knee", "spine", "abdomen")
SEQUENCES_BY_REGION = {"brain": ("T1", "T2", "FLAIR"), "knee": ("T1", "T2"), "spine": ("T1", "T2"), "abdomen": ("T1", "T2")}
MIN_PER_REGION = 3  # one each for train, val and test


def region_counts(subjects: int) -> dict[str, int]:
    """How many subjects each body region gets: half brain, the rest shared, at least 3 per region used.

    >>> region_counts(48)
    {'brain': 24, 'knee': 8, 'spine': 8, 'abdomen': 8}
    >>> region_counts(8)
    {'brain': 4, 'knee': 4}
    """
    if subjects < MIN_PER_REGION:
        raise ValueError(f"--subjects must be at least {MIN_PER_REGION} (one each for train, val and test), got {subjects}")
    n_regions = min(len(REGIONS), subjects // MIN_PER_REGION)
    others = REGIONS[1:n_regions]
    counts = {"brain": 0}
    if others:
        each = max(MIN_PER_REGION, (subjects - subjects // 2) // len(others))
        while subjects - each * len(others) < MIN_PER_REGION:
            each -= 1
        counts.update({r: each for r in others})
    counts["brain"] = subjects - sum(v for k, v in counts.items() if k != "brain")
    return counts


def plan_corpus(subjects: int, seed: int) -> list[SubjectPlan]:
    """Decide every subject's region, anatomy, sequence, lesion and split before building any.

    Sequences cycle within a region and normal studies fall on a different cycle (about 1 in 3),
    so sequence, lesion type and normality are not tied to each other. Splits are stratified:
    each region is shuffled and cut 60/20/20 with at least one subject in each split.

    >>> plans = plan_corpus(8, seed=0)
    """
    rng = np.random.default_rng(seed)
    plans: list[SubjectPlan] = []
    seeds = np.random.SeedSequence(seed).generate_state(subjects, dtype=np.uint64)
    for region, count in region_counts(subjects).items():
        order = rng.permutation(count)
        n_val = max(1, int(round(0.2 * count)))
        n_test = max(1, int(round(0.2 * count)))
        split_of = {}
        for rank, i in enumerate(order):
            split_of[int(i)] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        kinds = list(rng.permutation(lesion_types_for(region)))
        sequences = SEQUENCES_BY_REGION[region]
        n_lesions = 0
        for i in range(count):
            normal = i % 3 == 2
            # Brain cycles through three sequences like the normal/lesion cycle; shift it every
            # round so FLAIR is not always the normal one.
            seq = (i + i // 3) % len(sequences) if len(sequences) == 3 else i % len(sequences)
            lesion = None
            if not normal:
                lesion = str(kinds[n_lesions % len(kinds)])
                n_lesions += 1
            index = len(plans)
            plans.append(
                SubjectPlan(
                    index=index,
                    id=f"{region}-{i:03d}",
                    body_region=region,
                    anatomy=("colin27", "mni152")[i % 2] if region == "brain" else region,
                    sequence=sequences[seq],
                    lesion_type=lesion,
                    split=split_of[i],
                    seed=int(seeds[index]),
                )
            )
    return plans


def _labels_csv(names: dict[int, str]) -> str:
    lines = ["value,name"] + [f"{v},{names[v]}" for v in sorted(names)]
    return "\n".join(lines) + "\n"


README = """\
# DecipherMR demo corpus (generated, not clinical data)

Built by `decipher-mr demo-data` with seed {seed}: {n} series ({by_region}).

**What is real:** the brain anatomy comes from two real MRI templates, the Colin27 T1 head
(`ch2`, skull-stripped mask from `ch2bet`) and the MNI152 2009a T1 brain with its grey/white-matter
probability maps, and brain regions are the real AAL atlas (116 named regions; it lives on Colin27's
grid and is carried onto MNI152 through world coordinates).

**What is generated:** everything else. Each subject is a randomly deformed copy (affine and
elastic) of a template, resampled to a thin isotropic or thick-slice grid in one of several
orientations, with a simulated bias field and Rician noise. T2- and FLAIR-like images are
synthesized from tissue maps (T1 series keep the template's real intensities). Lesions are
synthetic blobs pasted into the anatomy. Knee, lumbar-spine and abdomen volumes are procedural
phantoms, not real anatomy. Reports are generated from templates and finding phrases of the
radiology-semantic-dict package. The manifest's `generated` field says, per series, what is
synthetic.

This corpus exists to exercise and test the DecipherMR pipeline offline. It is **not clinical
data**, and nothing trained on it is fit for any medical use.

Files: `manifest.jsonl` (one JSON object per series), `images/`, `masks/` (lesion masks),
`regions/` (AAL or phantom tissue labels, with `<set>_labels.csv`), `tissue/` (brain tissue
labels and `tissue_labels.csv`), `reports/`.
"""


def _build_one(plan: SubjectPlan, out: Path):
    """(plan id, built subject or None, error text or None): a worker process's unit of work."""
    try:
        return plan.id, build_subject(plan, out), None
    except Exception as exc:  # one bad subject must not sink the corpus
        return plan.id, None, str(exc)


def build_demo_corpus(out: str | Path, subjects: int = DEFAULT_SUBJECTS, seed: int = 0, progress: bool = True,
                      workers: int = 1) -> Path:
    """Build the demo corpus into ``out`` and return the manifest path. Same seed, same arrays, for any
    number of ``workers`` (processes; every subject's random stream comes from its plan alone).

    >>> manifest = build_demo_corpus("demo/data", subjects=8, seed=0, workers=2)
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from ...storage import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_corpus(subjects, seed)
    rows: list[dict[str, Any]] = []
    region_sets: dict[str, dict[int, str]] = {}
    failures: list[str] = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(_build_one, plans, [out] * len(plans)) if pool else (_build_one(p, out) for p in plans)
        bar = tqdm(results, total=len(plans), desc="demo subjects", unit="subject", disable=not progress, file=sys.stderr)
        built_all = []
        for plan_id, built, error in bar:
            bar.set_postfix_str(plan_id)
            if error is not None:
                failures.append(f"{plan_id}: {error}")
                print(f"warning: skipped {plan_id}: {error}", file=sys.stderr)
                continue
            built_all.append(built)
    finally:
        if pool:
            pool.shutdown()
    for built in built_all:
        rows.append(built.row)
        region_set = "aal" if built.row["source_anatomy"] in ("colin27", "mni152") else built.row["body_region"]
        region_sets.setdefault(region_set, {0: "background"}).update(built.region_names)
    if not rows:
        raise RuntimeError(f"{out}: no demo subject could be built: {'; '.join(failures)}")

    for name, names in region_sets.items():
        atomic_write_text(out / "regions" / f"{name}_labels.csv", _labels_csv(names))
    atomic_write_text(out / "tissue" / "tissue_labels.csv", _labels_csv({v: n for v, (n, _) in TISSUES.items()}))
    manifest = out / "manifest.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows))
    by_region = ", ".join(f"{k} {v}" for k, v in Counter(r["body_region"] for r in rows).items())
    atomic_write_text(out / "README.md", README.format(seed=seed, n=len(rows), by_region=by_region))
    return manifest


def summarize(manifest: str | Path) -> dict[str, dict[str, int]]:
    """Counts by body region, sequence, lesion/normal and split (no report text is read).

    >>> summarize("demo/data/manifest.jsonl")["split"]
    {'train': 30, 'val': 9, 'test': 9}
    """
    rows = [json.loads(line) for line in Path(manifest).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {
        "body_region": dict(Counter(r["body_region"] for r in rows)),
        "sequence": dict(Counter(r["sequence"] for r in rows)),
        "finding": dict(Counter("lesion" if r["labels"]["lesion_present"] else "normal" for r in rows)),
        "lesion_type": dict(Counter(r["labels"]["lesion_type"] for r in rows if r["labels"]["lesion_present"])),
        "split": dict(Counter(r["split"] for r in rows)),
    }
