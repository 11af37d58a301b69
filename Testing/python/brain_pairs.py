"""A small image–report corpus on real anatomy for the text/alignment/retrieval tests.

Colin27 (real T1) resampled to 4 mm, shown as T1 or a T2-like contrast (the tissue intensities
inverted inside the brain), with an optional spherical lesion placed at the centroid of a real AAL
region, and a generated report (labelled as generated) that names sequence, size and place. It is
written as a real prepared cache (``index.jsonl`` + ``items/*.npy``) and read back through
``PreparedCache``. Deterministic for a seed; builds in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from decipher_mr.assets import aal_atlas, colin27_t1
from decipher_mr.storage import atomic_save_npy, atomic_write_json, atomic_write_text

# AAL label -> how a report names the place
PLACES = {
    3: "left frontal lobe",
    4: "right frontal lobe",
    51: "left occipital lobe",
    52: "right occipital lobe",
    85: "left temporal lobe",
    86: "right temporal lobe",
    59: "left parietal lobe",
    60: "right parietal lobe",
}
SPACING = 4.0


def _load(path: Path, interpolator) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    factor = [SPACING / s for s in img.GetSpacing()]
    size = [int(round(n / f)) for n, f in zip(img.GetSize(), factor)]
    res = sitk.Resample(img, size, sitk.Transform(), interpolator, img.GetOrigin(), (SPACING,) * 3,
                        img.GetDirection(), 0, img.GetPixelID())
    return sitk.GetArrayFromImage(res).transpose(2, 1, 0).astype(np.float32)  # -> [i, j, k]


def report_for(sequence: str, place: str | None, size_mm: int | None) -> str:
    tech = f"TECHNIQUE: {sequence}-weighted MRI of the brain (generated report)."
    if place is None:
        return (f"CLINICAL HISTORY: headache. {tech} FINDINGS: No focal lesion. Ventricles are normal in size. "
                f"IMPRESSION: Normal study.")
    look = "hyperintense" if sequence == "T2" else "hypointense"
    return (f"CLINICAL HISTORY: headache. {tech} FINDINGS: There is a {size_mm} mm {look} lesion in the {place}. "
            f"No other abnormality. IMPRESSION: {size_mm} mm lesion in the {place}.")


def build_brain_pairs(out: Path, n_train: int = 48, n_val: int = 8, n_test: int = 32, seed: int = 0) -> Path:
    """Write the corpus as a prepared cache under ``out`` and return ``out``.

    >>> cache = PreparedCache(build_brain_pairs(tmp_path / "pairs"))
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    t1 = _load(colin27_t1("ch2"), sitk.sitkLinear)
    aal = _load(aal_atlas(), sitk.sitkNearestNeighbor).round().astype(np.int16)
    brain = aal > 0
    brain = ndimage.binary_closing(brain, iterations=2)
    t1 = (t1 - t1[brain].mean()) / (t1[brain].std() + 1e-6)
    t2 = np.where(brain, -t1, t1 * 0.3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in t1.shape], indexing="ij"), -1).astype(np.float32)
    centroids = {lab: np.array(ndimage.center_of_mass(aal == lab)) for lab in PLACES}
    index_lines = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for n, split in enumerate(splits):
        sequence = ["T1", "T2"][int(rng.integers(2))]
        lesion = rng.random() < 0.8
        label = int(rng.choice(list(PLACES))) if lesion else None
        size_mm = int(rng.choice([8, 12, 16, 20])) if lesion else None
        vol = (t1 if sequence == "T1" else t2).copy()
        if label is not None:
            radius = size_mm / 2 / SPACING + 0.5
            centre = centroids[label] + rng.normal(0, 0.7, 3)
            ball = np.linalg.norm(grid - centre, axis=-1) <= radius
            vol[ball] = -2.5 if sequence == "T1" else 3.0
        vol = vol * rng.uniform(0.95, 1.05) + rng.normal(0, 0.05, vol.shape).astype(np.float32)
        item_id = f"pair{n:03d}"
        atomic_save_npy(out / "items" / f"{item_id}.npy", vol.astype(np.float32))
        index_lines.append(json.dumps({
            "id": item_id, "array": f"items/{item_id}.npy", "shape": list(vol.shape), "spacing": [SPACING] * 3,
            "body_region": "brain", "sequence": sequence, "split": split, "study_id": item_id,
            "report": report_for(sequence, PLACES.get(label) if label else None, size_mm),
            "labels": {"lesion": bool(lesion), "lesion_location": PLACES.get(label) if label else None},
            "source": "colin27 (generated lesion and report)",
        }))
    atomic_write_json(out / "cache.json", {"format": 1, "preprocess": {"spacing": [SPACING] * 3}})
    atomic_write_text(out / "index.jsonl", "\n".join(index_lines) + "\n")
    return out
