"""Generated radiology-style reports (FINDINGS / IMPRESSION) for the demo corpus.

Sentences come from small templates plus real finding phrases of ``radiology-semantic-dict``
(MRI records only), picked per lesion type and sequence with the subject's own random generator,
so the same seed always writes the same report. Reports are generated text, not clinical data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SEQUENCE_WORDS = {"T1": "T1-weighted", "T2": "T2-weighted", "FLAIR": "FLAIR"}
REGION_WORDS = {"brain": "brain", "knee": "knee", "spine": "lumbar spine", "abdomen": "upper abdomen"}

# (tag, sentence): a lesion drops the normal sentences its type contradicts (see CONTRADICTS).
NORMAL_FINDINGS: dict[str, list[tuple[str, str]]] = {
    "brain": [
        ("ventricles", "The ventricles and sulci are of normal size for age."),
        ("parenchyma", "Grey-white matter differentiation is preserved."),
        ("parenchyma", "No abnormal signal in the brain parenchyma."),
        ("mass", "No mass effect or midline shift."),
        ("fossa", "The posterior fossa structures are unremarkable."),
        ("extra", "No extra-axial collection."),
    ],
    "knee": [
        ("ligaments", "The cruciate and collateral ligaments are intact."),
        ("menisci", "The menisci are of normal morphology and signal."),
        ("cartilage", "Articular cartilage is preserved."),
        ("effusion", "No joint effusion."),
        ("marrow", "Bone marrow signal is normal."),
        ("tendons", "The extensor mechanism is intact."),
    ],
    "spine": [
        ("alignment", "Normal lumbar lordosis and vertebral alignment."),
        ("marrow", "Vertebral body heights and marrow signal are maintained."),
        ("discs", "The intervertebral discs are of normal height and signal."),
        ("conus", "The conus medullaris terminates at a normal level."),
        ("canal", "No spinal canal or foraminal stenosis."),
    ],
    "abdomen": [
        ("liver", "The liver is of normal size and signal without focal lesion."),
        ("spleen", "The spleen is unremarkable."),
        ("kidney", "Both kidneys are normal in size without focal lesion or hydronephrosis."),
        ("vessels", "The abdominal aorta and IVC are of normal calibre."),
        ("fluid", "No free fluid or lymphadenopathy."),
    ],
}
CONTRADICTS = {
    "glioblastoma": {"parenchyma", "mass"}, "metastasis": {"parenchyma"}, "demyelinating_plaque": {"parenchyma"},
    "infarct": {"parenchyma"}, "abscess": {"parenchyma", "mass"}, "bone_marrow_edema": {"marrow"},
    "meniscal_tear": {"menisci"}, "vertebral_metastasis": {"marrow"}, "disc_herniation": {"discs", "canal"},
    "hepatic_hemangioma": {"liver"}, "liver_metastasis": {"liver"}, "renal_cyst": {"kidney"},
}
NORMAL_IMPRESSIONS = {
    "brain": ["No acute intracranial abnormality.", "Normal MRI of the brain.", "No intracranial lesion identified."],
    "knee": ["Normal MRI of the knee.", "No internal derangement of the knee."],
    "spine": ["Normal MRI of the lumbar spine.", "No disc herniation or focal marrow lesion of the spine."],
    "abdomen": ["Normal MRI of the upper abdomen.", "No focal abdominal organ lesion."],
}
FOLLOW_UP = ["Clinical correlation is recommended.", "Follow-up imaging is suggested.", "", "Comparison with prior imaging would be helpful."]
# Phrases about other techniques (spectroscopy, perfusion, diffusion, statistics) do not describe the
# series we generate; avoid them when a better one exists.
_OFF_TOPIC = re.compile(r"DWI|ADC|spectroscop|MRS|rCBV|CBV|perfusion|sensitivity|specificity|\bAI\b|criteria|DSC|SWI|GRE|%|NAA|choline|alanine", re.I)


@dataclass
class LesionFacts:
    """What the report says about one lesion."""

    kind: str
    words: str
    location: str
    diameter_mm: float
    volume_ml: float
    signal: str
    rim_words: str
    pathologies: tuple[str, ...]


@lru_cache(maxsize=1)
def _mri_findings() -> dict[str, list[tuple[str, str]]]:
    from ... import assets

    records = json.loads(assets.radiology_findings().read_text(encoding="utf-8"))
    by_pathology: dict[str, list[tuple[str, str]]] = {}
    for rec in records:
        if "MRI" not in str(rec.get("modality", "")):
            continue
        name, desc = str(rec.get("name", "")).strip(), str(rec.get("description", "")).strip()
        if name:
            by_pathology.setdefault(str(rec.get("pathology_name", "")), []).append((name, desc))
    for key in by_pathology:
        by_pathology[key].sort()  # file order must not matter for determinism
    return by_pathology


def finding_phrase(
    pathologies: tuple[str, ...], sequence: str, rng: np.random.Generator, signal: str | None = None
) -> tuple[str, str, str] | None:
    """One (pathology, finding name, description) for these pathologies, preferring this sequence.

    Phrases that contradict the lesion's ``signal`` on this series (a "hyperintense" phrase for a
    hypointense lesion) are never used; without a compatible phrase the answer is None.

    >>> finding_phrase(("Brain Metastases",), "T2", np.random.default_rng(0), "hyperintense")
    ('Brain Metastases', 'Hyperintense', 'T2WI (due to edema)')
    """
    table = _mri_findings()
    pool = [(p, n, d) for p in pathologies for n, d in table.get(p, [])]
    contradicting = {"hyperintense": ("hypointense",), "hypointense": ("hyperintense",),
                     "isointense": ("hyperintense", "hypointense")}.get(signal or "", ())
    pool = [r for r in pool if not any(word in (r[1] + " " + r[2]).lower() for word in contradicting)]
    if not pool:
        return None
    on_topic = [r for r in pool if not _OFF_TOPIC.search(r[1] + " " + r[2])] or pool
    token = {"T1": "T1", "T2": "T2", "FLAIR": "FLAIR"}[sequence]
    matching = [r for r in on_topic if token.lower() in (r[1] + " " + r[2]).lower()]
    choices = matching or on_topic
    return choices[int(rng.integers(len(choices)))]


def _short_pathology(name: str) -> str:
    return re.sub(r"\s*\(.*?\)", "", name).strip()


def write_report(
    body_region: str,
    sequence: str,
    plane: str,
    spacing: tuple[float, float, float],
    lesion: LesionFacts | None,
    rng: np.random.Generator,
) -> str:
    """A FINDINGS / IMPRESSION report for one generated series.

    >>> write_report("knee", "T2", "sagittal", (1.5, 1.5, 4.0), None, np.random.default_rng(0))
    'EXAMINATION: MRI of the knee, sagittal T2-weighted series ...'
    """
    seq_words = SEQUENCE_WORDS[sequence]
    region_words = REGION_WORDS[body_region]
    voxel = " x ".join(f"{s:g}" for s in spacing)
    lines = [f"EXAMINATION: MRI of the {region_words}, {plane} {seq_words} series ({voxel} mm voxels)."]
    findings: list[str] = []
    impression: list[str] = []
    drop = CONTRADICTS.get(lesion.kind, set()) if lesion else set()
    normal = [text for tag, text in NORMAL_FINDINGS[body_region] if tag not in drop]
    keep = sorted(rng.choice(len(normal), size=min(len(normal), int(rng.integers(3, len(normal) + 1))), replace=False))
    if lesion is not None:
        rim = f", with {lesion.rim_words}" if lesion.rim_words else ""
        findings.append(
            f"There is a {lesion.diameter_mm:.0f} mm {lesion.words} in the {lesion.location}, "
            f"{lesion.signal} on {seq_words} images{rim}, with a volume of approximately {lesion.volume_ml:.1f} mL."
        )
        phrase = finding_phrase(lesion.pathologies, sequence, rng, lesion.signal)
        pathology = _short_pathology(phrase[0]) if phrase else _short_pathology(lesion.pathologies[0])
        if phrase:
            _, name, desc = phrase
            detail = f" ({desc.rstrip('.')})" if desc else ""
            findings.append(f"Appearance in keeping with {pathology}: {name[0].lower() + name[1:] if name[1:2].islower() else name}{detail}.")
        impression.append(f"{lesion.diameter_mm:.0f} mm {lesion.words} in the {lesion.location}, consistent with {pathology}.")
        follow = FOLLOW_UP[int(rng.integers(len(FOLLOW_UP)))]
        if follow:
            impression.append(follow)
    findings.extend(normal[i] for i in keep)
    if lesion is None:
        impression.append(NORMAL_IMPRESSIONS[body_region][int(rng.integers(len(NORMAL_IMPRESSIONS[body_region])))])
    lines.append("FINDINGS: " + " ".join(findings))
    lines.append("IMPRESSION: " + " ".join(impression))
    return "\n".join(lines) + "\n"
