"""Tissue label table and the sequence contrasts that turn tissue maps into T1-, T2- and FLAIR-like images.

The relative signal values follow the textbook ordering of each tissue on spin-echo T1, T2 and
FLAIR at 1.5-3 T (CSF dark on T1 and FLAIR, bright on T2; fat bright on T1; cortical bone and
flowing blood dark everywhere). They are not quantitative relaxometry: what matters for training is
that the contrast between tissues changes with the sequence the way it does on real scanners.
"""

from __future__ import annotations

import numpy as np

SEQUENCES = ("T1", "T2", "FLAIR")

# value -> (name, (T1, T2, FLAIR) relative signal). One table for every body region, so a tissue
# label means the same thing in every file of the corpus.
TISSUES: dict[int, tuple[str, tuple[float, float, float]]] = {
    0: ("background", (0.0, 0.0, 0.0)),
    1: ("csf", (0.12, 1.00, 0.07)),
    2: ("grey_matter", (0.52, 0.68, 0.62)),
    3: ("white_matter", (0.80, 0.45, 0.46)),
    4: ("head_soft_tissue_and_skull", (0.60, 0.45, 0.40)),
    5: ("fat", (0.92, 0.72, 0.68)),
    6: ("muscle", (0.40, 0.30, 0.30)),
    7: ("cortical_bone", (0.04, 0.04, 0.04)),
    8: ("bone_marrow", (0.82, 0.62, 0.55)),
    9: ("cartilage", (0.45, 0.52, 0.45)),
    10: ("meniscus_ligament", (0.06, 0.05, 0.05)),
    11: ("joint_fluid", (0.15, 0.98, 0.10)),
    12: ("disc_annulus", (0.30, 0.28, 0.26)),
    13: ("disc_nucleus", (0.35, 0.88, 0.40)),
    14: ("spinal_cord", (0.50, 0.52, 0.50)),
    15: ("liver", (0.62, 0.33, 0.34)),
    16: ("kidney", (0.48, 0.70, 0.55)),
    17: ("spleen", (0.45, 0.62, 0.50)),
    18: ("vessel_flow_void", (0.05, 0.05, 0.05)),
    19: ("bowel", (0.40, 0.50, 0.45)),
}

TISSUE_VALUE = {name: value for value, (name, _) in TISSUES.items()}
BRAIN_TISSUES = (TISSUE_VALUE["csf"], TISSUE_VALUE["grey_matter"], TISSUE_VALUE["white_matter"])


def signal_table(sequence: str) -> np.ndarray:
    """Lookup array ``label -> relative signal`` for one sequence.

    >>> signal_table("T2")[TISSUE_VALUE["csf"]]
    1.0
    """
    col = _sequence_column(sequence)
    table = np.zeros(max(TISSUES) + 1, np.float32)
    for value, (_, signals) in TISSUES.items():
        table[value] = signals[col]
    return table


def tissue_signal(name: str, sequence: str) -> float:
    """Relative signal of a named tissue, e.g. ``tissue_signal("white_matter", "T1") -> 0.8``."""
    return float(TISSUES[TISSUE_VALUE[name]][1][_sequence_column(sequence)])


def _sequence_column(sequence: str) -> int:
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}")
    return SEQUENCES.index(sequence)


def smooth_texture(shape: tuple[int, ...], rng: np.random.Generator, cell: int = 6) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: tissue is never perfectly flat on real MRI.

    >>> tex = smooth_texture((90, 110, 90), np.random.default_rng(0))
    """
    from scipy import ndimage as ndi

    coarse_shape = tuple(max(2, -(-n // cell) + 1) for n in shape)
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse_shape)]
    field = ndi.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")
    return field[tuple(slice(0, n) for n in shape)]


def synthesize_from_labels(labels: np.ndarray, sequence: str) -> np.ndarray:
    """A sequence-like image from a hard tissue label map (used for the procedural phantoms).

    >>> img = synthesize_from_labels(tissue, "T2")
    """
    return signal_table(sequence)[labels]


def synthesize_brain(
    probabilities: dict[str, np.ndarray],
    real_t1: np.ndarray,
    brain_weight: np.ndarray,
    sequence: str,
) -> np.ndarray:
    """A T1/T2/FLAIR-like head image from soft CSF/GM/WM maps and the real T1.

    For T1 the real template intensities are kept (they are the most realistic thing we have);
    for T2 and FLAIR the brain is rebuilt from the soft tissue maps, so partial volume at tissue
    borders survives, and the real T1's fine structure is mixed back in with the sign flipped
    (structures bright on T1 within a tissue class tend to be darker on T2).
    ``brain_weight`` (0..1) blends the synthetic brain with the non-brain head from the real T1.

    >>> img = synthesize_brain(probs, t1, brain, "FLAIR")
    """
    if sequence == "T1":
        img = real_t1.astype(np.float32, copy=True)
    else:
        col = _sequence_column(sequence)
        brain = np.zeros_like(real_t1, dtype=np.float32)
        expected_t1 = np.zeros_like(brain)
        for name, prob in probabilities.items():
            signals = TISSUES[TISSUE_VALUE[name]][1]
            brain += prob * signals[col]
            expected_t1 += prob * signals[0]
        # Residual of the real T1 against what its tissue mixture predicts = anatomy detail.
        detail = np.clip(real_t1 - expected_t1, -0.2, 0.2)
        brain -= 0.5 * detail * brain_weight
        head_scale = TISSUES[TISSUE_VALUE["head_soft_tissue_and_skull"]][1][col] / TISSUES[4][1][0]
        img = brain_weight * brain + (1.0 - brain_weight) * real_t1 * head_scale
    np.clip(img, 0.0, None, out=img)
    return img
