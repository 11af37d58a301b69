"""The GPU benchmark's data (``gpu_bench.py``): a small prepared cache of synthetic head-like volumes
with short reports, and a WordPiece vocabulary for a random BERT. The demo corpus needs SimpleITK,
nibabel and nilearn, and the packaged MiniLM tokenizer is absent: neither is on the GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


PLACES = ["left frontal lobe", "right parietal lobe", "left temporal lobe", "right occipital lobe", "cerebellum",
          "left basal ganglia", "right centrum semiovale", "corpus callosum"]
WORDS = ("no acute intracranial abnormality . mild periventricular white matter hyperintensity small focal lesion "
         "in the measuring mm with surrounding oedema no mass effect midline shift ventricles normal size "
         "findings impression t1 t2 flair weighted axial images of brain were obtained enhancement after contrast "
         "chronic microvascular change lacunar infarct restricted diffusion haemorrhage normal study").split()


def synthetic_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """A head-like MR volume: nested ellipsoids (skull, CSF, grey, white matter, ventricles), a lesion,
    a smooth multiplicative bias field and noise, z-scored inside the head; float32."""
    axes = [(np.arange(s) - (s - 1) / 2) * sp for s, sp in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = np.array([s * sp / 2 for s, sp in zip(shape, spacing)]) * rng.uniform(0.78, 0.9, 3)
    r = np.sqrt((x / half[0]) ** 2 + (y / half[1]) ** 2 + (z / max(half[2], 1e-3)) ** 2)
    vol = np.zeros(shape, np.float32)
    for radius, value in ((1.0, 0.35), (0.93, 0.15), (0.88, 0.62), (0.70, 0.85)):  # skull, CSF, GM, WM
        vol[r <= radius] = value
    vent = np.sqrt((np.abs(x) / (0.12 * half[0]) - 1.2) ** 2 + (y / (0.35 * half[1])) ** 2 + (z / (0.5 * half[2] + 1e-3)) ** 2)
    vol[vent <= 1.0] = 0.15
    c = rng.uniform(-0.4, 0.4, 3) * half
    lesion = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) <= rng.uniform(4, 10) ** 2
    vol[lesion & (r < 0.85)] = rng.choice([0.3, 1.0])
    bias = 1 + 0.15 * np.sin(x / half[0] * rng.uniform(1, 2)) * np.cos(y / half[1] * rng.uniform(1, 2))
    vol = vol * bias + rng.normal(0, 0.03, shape)
    vol = np.abs(vol).astype(np.float32)
    inside = r <= 1.0
    m, s = vol[inside].mean(), vol[inside].std() + 1e-6
    return ((vol - m) / s).astype(np.float32)


def synthetic_report(rng: np.random.Generator) -> str:
    place = PLACES[int(rng.integers(len(PLACES)))]
    size = int(rng.choice([4, 8, 12, 16]))
    extra = " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=int(rng.integers(20, 120))))
    return (f"TECHNIQUE: axial T1 and T2 weighted images. FINDINGS: a {size} mm lesion in the {place}. {extra}. "
            f"IMPRESSION: focal lesion in the {place}.")


def build_synthetic_cache(root: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                          seed: int = 0) -> Path:
    """A prepared cache (cache.json, index.jsonl, items/*.npy) of ``n`` synthetic brain volumes with reports."""
    items = root / "items"
    items.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        item_id = f"synth{i:03d}"
        np.save(items / f"{item_id}.npy", synthetic_volume(shape, spacing, rng))
        rows.append({"id": item_id, "array": f"items/{item_id}.npy", "shape": list(shape), "spacing": list(spacing),
                     "body_region": "brain", "sequence": ["T1", "T2"][i % 2], "split": "train",
                     "study_id": f"study{i:03d}", "report": synthetic_report(rng)})
    (root / "cache.json").write_text(json.dumps({"format": 1, "preprocess": {"synthetic": True}}))
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_tokenizer_folder(folder: Path, reports: list[str]) -> Path:
    """A WordPiece vocabulary (BERT special tokens, characters, the reports' words) for a random BERT:
    the packaged MiniLM tokenizer is not on the GPU machine."""
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for r in reports for w in r.lower().replace(".", " . ").replace(":", " : ").replace(",", " , ").split()})
    chars = sorted({c for r in reports for c in r.lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "..."] + chars + [f"##{c}" for c in chars] + words
    seen: dict[str, None] = {}
    for v in vocab:
        seen.setdefault(v, None)
    (folder / "vocab.txt").write_text("\n".join(seen) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    return folder
