"""Synthetic lesions pasted into an anatomy before it is deformed and resampled.

A lesion is a smooth, slightly irregular ellipsoid centred on a voxel of its host tissue (white
matter for a demyelinating plaque, liver for a haemangioma, ...). Its signal depends on the
sequence the way the textbook says (hyperintense on T2/FLAIR, hypo- or isointense on T1); some types
have a rim of different signal (the enhancing wall of a metastasis or abscess). The mask is clipped
to the anatomy's ``lesion_space`` so a lesion never pokes out of the brain or the body.

Pasting happens on the source grid, so the later deformation, slice thickness and nearest-neighbour
mask resampling treat lesion and anatomy the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import SourceAnatomy
from .contrast import SEQUENCES, TISSUE_VALUE, smooth_texture, tissue_signal


@dataclass(frozen=True)
class LesionType:
    """What a kind of lesion looks like and where it grows."""

    key: str
    words: str  # how a report names it
    body_region: str
    hosts: tuple[str, ...]  # tissue names the centre may sit in
    radius_mm: tuple[float, float]
    core: tuple[float, float, float]  # T1, T2, FLAIR relative signal
    rim: tuple[float, float, float] | None = None
    rim_words: str = ""
    elongation: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pathologies: tuple[str, ...] = ()  # pathology names in radiology-semantic-dict
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS shift from the host voxel

    def signal(self, sequence: str, rim: bool = False) -> float:
        values = self.rim if rim and self.rim is not None else self.core
        return float(values[SEQUENCES.index(sequence)])


LESION_TYPES: dict[str, LesionType] = {
    t.key: t
    for t in (
        LesionType("glioblastoma", "heterogeneous mass with central necrosis", "brain", ("white_matter",), (9, 15),
                   (0.22, 1.0, 0.60), (0.95, 0.70, 0.85), "a thick irregular enhancing rim",
                   pathologies=("Glioblastoma (GBM)",)),
        LesionType("metastasis", "rounded metastatic lesion", "brain", ("grey_matter", "white_matter"), (4, 9),
                   (0.35, 0.85, 0.80), (0.95, 0.70, 0.85), "a thin enhancing rim",
                   pathologies=("Brain Metastases",)),
        LesionType("demyelinating_plaque", "ovoid demyelinating plaque", "brain", ("white_matter",), (3, 6),
                   (0.55, 0.90, 0.88), elongation=(1.6, 1.0, 1.0),
                   pathologies=("Multiple Sclerosis (MS)", "Demyelination (e.g., Multiple Sclerosis)")),
        LesionType("infarct", "wedge-shaped infarct", "brain", ("grey_matter",), (7, 13),
                   (0.32, 0.90, 0.86), elongation=(1.0, 1.3, 0.8),
                   pathologies=("Infarct", "Lacunar Infarction", "Watershed Infarction")),
        LesionType("abscess", "ring-walled abscess", "brain", ("white_matter", "grey_matter"), (6, 10),
                   (0.15, 1.0, 0.75), (0.90, 0.35, 0.60), "a smooth thin rim",
                   pathologies=("Brain Abscess",)),
        LesionType("bone_marrow_edema", "bone marrow oedema", "knee", ("bone_marrow",), (8, 14),
                   (0.30, 0.88, 0.80), pathologies=("Bone Marrow Edema", "Bone marrow edema")),
        LesionType("meniscal_tear", "meniscal tear", "knee", ("meniscus_ligament",), (3, 5),
                   (0.35, 0.80, 0.30), elongation=(1.8, 1.0, 0.5), pathologies=("Meniscal Tear",)),
        LesionType("vertebral_metastasis", "vertebral body metastasis", "spine", ("bone_marrow",), (7, 11),
                   (0.30, 0.85, 0.75), pathologies=("Bone Metastases",)),
        LesionType("disc_herniation", "posterior disc herniation", "spine", ("disc_nucleus",), (5, 7),
                   (0.35, 0.85, 0.40), elongation=(1.4, 1.0, 0.7), offset_mm=(0.0, 11.0, 0.0),
                   pathologies=("Disc Herniation",)),
        LesionType("hepatic_hemangioma", "hepatic haemangioma", "abdomen", ("liver",), (8, 16),
                   (0.30, 1.10, 0.90), pathologies=("Hepatic Hemangioma", "Hemangioma (Liver)")),
        LesionType("liver_metastasis", "hepatic metastasis", "abdomen", ("liver",), (6, 12),
                   (0.35, 0.60, 0.60), (0.50, 0.80, 0.70), "a peripheral rim",
                   pathologies=("Liver Metastases",)),
        LesionType("renal_cyst", "simple renal cyst", "abdomen", ("kidney",), (6, 11),
                   (0.12, 1.00, 0.07), pathologies=("renal cyst", "Renal Cysts")),
    )
}


def lesion_types_for(body_region: str) -> list[str]:
    """Lesion type keys that can appear in a body region, e.g. ``lesion_types_for("knee")``."""
    return [k for k, t in LESION_TYPES.items() if t.body_region == body_region]


def signal_words(kind: LesionType, sequence: str, host: str) -> str:
    """'hyperintense' / 'hypointense' / 'isointense' relative to the host tissue on this sequence."""
    ratio = kind.signal(sequence) / max(1e-3, tissue_signal(host, sequence))
    if ratio > 1.15:
        return "hyperintense"
    if ratio < 0.85:
        return "hypointense"
    return "isointense"


@dataclass
class PastedLesion:
    """A lesion on the source grid: its box, soft weights and binary mask (all inside the box)."""

    kind: LesionType
    box: tuple[slice, slice, slice]
    alpha: np.ndarray  # 0..1 lesion weight
    rim: np.ndarray  # 0..1 rim weight inside the lesion
    mask: np.ndarray  # bool
    host: str
    centre_index: np.ndarray

    def full_mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        out = np.zeros(shape, np.uint8)
        out[self.box] = self.mask
        return out

    def paint(self, image: np.ndarray, sequence: str, rng: np.random.Generator) -> None:
        """Blend the lesion's signal into ``image`` (in place) for this sequence."""
        core = self.kind.signal(sequence)
        rim = self.kind.signal(sequence, rim=True)
        value = core * (1.0 - self.rim) + rim * self.rim
        value = value * (1.0 + 0.06 * smooth_texture(self.alpha.shape, rng, cell=3))
        region = image[self.box]
        region *= 1.0 - self.alpha
        region += self.alpha * value


def paste_lesion(anatomy: SourceAnatomy, kind_key: str, rng: np.random.Generator, min_voxels: int = 20) -> PastedLesion:
    """Choose a centre in the host tissue and build a lesion of type ``kind_key`` around it.

    >>> lesion = paste_lesion(colin27(), "metastasis", np.random.default_rng(0))
    """
    kind = LESION_TYPES[kind_key]
    host_mask = np.isin(anatomy.tissue, [TISSUE_VALUE[h] for h in kind.hosts]) & anatomy.lesion_space
    candidates = np.flatnonzero(host_mask)
    if candidates.size == 0:
        raise ValueError(f"{anatomy.name}: no {'/'.join(kind.hosts)} voxels to place a {kind.key} in")
    linear = anatomy.affine_lps[:3, :3]
    inv_linear = np.linalg.inv(linear)
    for _attempt in range(20):
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], host_mask.shape), float)
        host_value = int(anatomy.tissue[tuple(centre.astype(int))])
        centre = centre + inv_linear @ np.asarray(kind.offset_mm)
        radius = rng.uniform(*kind.radius_mm)
        axes = radius * np.asarray(kind.elongation) * rng.uniform(0.85, 1.15, 3)
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # random orientation of the ellipsoid
        half = np.ceil(np.abs(inv_linear) @ np.full(3, axes.max() * 1.4 + 2)).astype(int)
        lo = np.maximum(0, np.round(centre).astype(int) - half)
        hi = np.minimum(np.array(anatomy.tissue.shape), np.round(centre).astype(int) + half + 1)
        if np.any(hi - lo < 3):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        idx = np.indices(tuple(hi - lo), dtype=np.float32).reshape(3, -1) + lo[:, None] - centre[:, None]
        local = (q.T @ (linear @ idx)) / axes[:, None]  # ellipsoid frame, unit sphere = surface
        rho = np.sqrt((local**2).sum(axis=0)).reshape(tuple(hi - lo))
        rho *= 1.0 + 0.12 * smooth_texture(rho.shape, rng, cell=4)  # irregular, not a perfect ellipsoid
        inside = anatomy.lesion_space[box]
        mean_radius = float(axes.mean())
        alpha = np.clip(0.5 - (rho - 1.0) * mean_radius / 1.5, 0.0, 1.0).astype(np.float32) * inside
        mask = (rho <= 1.0) & inside
        if mask.sum() < min_voxels:
            continue
        rim = np.zeros_like(alpha)
        if kind.rim is not None:
            rim = np.clip((rho - 0.72) / 0.08, 0.0, 1.0).astype(np.float32)
        host = next(name for name in kind.hosts if TISSUE_VALUE[name] == host_value)
        return PastedLesion(kind, box, alpha, rim, mask, host, centre)
    raise ValueError(f"{anatomy.name}: could not place a {kind.key} inside the anatomy")


def lesion_region_label(anatomy: SourceAnatomy, lesion: PastedLesion, max_reach_mm: float = 25.0) -> int:
    """The region label most of the lesion lies in.

    AAL labels grey matter only, so a white-matter lesion takes the region that is most common in a
    shell around it, grown until it meets labelled cortex (as a radiologist would say "in the left
    frontal lobe near the superior frontal gyrus").
    """
    values = anatomy.regions[lesion.box][lesion.mask]
    values = values[values > 0]
    if values.size:
        return int(np.bincount(values.astype(np.int64)).argmax())
    spacing = float(anatomy.spacing.min())
    for reach_mm in (4.0, 8.0, 12.0, 18.0, max_reach_mm):
        pad = int(np.ceil(reach_mm / spacing))
        box = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(lesion.box, anatomy.regions.shape))
        inner = np.zeros(tuple(s.stop - s.start for s in box), bool)
        inner[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(lesion.box, box))] = lesion.mask
        near = ndi.distance_transform_edt(~inner, sampling=anatomy.spacing) <= reach_mm
        values = anatomy.regions[box][near & anatomy.lesion_space[box]]
        values = values[values > 0]
        if values.size:
            return int(np.bincount(values.astype(np.int64)).argmax())
    return 0
