"""Building one demo subject: anatomy -> contrast -> lesion -> deformation and acquisition -> files.

Everything random about a subject comes from its own generator (seeded by the corpus seed and the
subject's index), so subjects are independent of each other and of the order they are built in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .anatomy import BRAIN_TEMPLATES, SourceAnatomy, aal_name_in_words
from .augment import AcquisitionGrid, Deformation, bias_field, grid_covering, point_spread_sigma, resample_image, resample_labels, rician_noise
from .contrast import smooth_texture, synthesize_brain, synthesize_from_labels
from .lesions import LESION_TYPES, PastedLesion, lesion_region_label, paste_lesion, signal_words
from .phantoms import PHANTOMS
from .reports import LesionFacts, write_report

# plane -> orientation codes (ITK style: where i, j, k point). The third letter is the slice axis.
ORIENTATIONS = {
    "axial": ("LPS", "RAS", "LAS", "RPI"),
    "coronal": ("LIP", "RSA", "LSA"),
    "sagittal": ("PIL", "ASR", "AIL"),
}
# body region -> (thin isotropic spacing, [(plane, spacing) of thick-slice protocols])
PROTOCOLS: dict[str, tuple[float, list[tuple[str, tuple[float, float, float]]]]] = {
    "brain": (2.0, [("axial", (1.5, 1.5, 4.0)), ("axial", (2.0, 2.0, 4.0)), ("coronal", (2.0, 2.0, 4.0))]),
    "knee": (1.75, [("sagittal", (1.5, 1.5, 4.0)), ("coronal", (1.5, 1.5, 4.0))]),
    "spine": (2.0, [("sagittal", (1.5, 1.5, 4.0)), ("axial", (1.75, 1.75, 4.0))]),
    "abdomen": (3.0, [("axial", (2.5, 2.5, 5.0)), ("coronal", (2.5, 2.5, 5.0))]),
}


@dataclass
class SubjectPlan:
    """What one subject will be; decided up front so splits and balance are known before building."""

    index: int
    id: str
    body_region: str
    anatomy: str  # "colin27", "mni152", or the phantom's body region
    sequence: str
    lesion_type: str | None
    split: str
    seed: int


@dataclass
class BuiltSubject:
    row: dict[str, Any]
    region_names: dict[int, str]


def _anatomy_for(plan: SubjectPlan, rng: np.random.Generator) -> SourceAnatomy:
    if plan.anatomy in BRAIN_TEMPLATES:
        return BRAIN_TEMPLATES[plan.anatomy]()
    return PHANTOMS[plan.anatomy](rng)


def _choose_acquisition(region: str, anatomy: SourceAnatomy, rng: np.random.Generator) -> tuple[AcquisitionGrid, str]:
    thin, thick = PROTOCOLS[region]
    lo, hi = anatomy.foreground_bounds_mm(margin=8.0)
    if rng.random() < 0.5:
        code = str(rng.choice(sum(ORIENTATIONS.values(), ())))
        return grid_covering(lo, hi, (thin, thin, thin), code), "3D isotropic"
    plane, spacing = thick[int(rng.integers(len(thick)))]
    code = str(rng.choice(ORIENTATIONS[plane]))
    return grid_covering(lo, hi, spacing, code), plane


def _phantom_location(kind: str, centre: np.ndarray) -> str:
    """Readable place of a phantom lesion from its centre in the phantom's own (undeformed) frame."""
    x, y, z = (float(v) for v in centre)
    if kind == "meniscal_tear":  # the knee phantom is a right knee: medial is towards patient-left (+x)
        return ("medial" if x > 0 else "lateral") + " meniscus"
    if kind == "bone_marrow_edema":
        if y < -30:
            return "patella"
        side = "medial" if x > 0 else "lateral"
        return f"{side} femoral condyle" if z > -7 else f"{side} tibial plateau"
    if kind == "vertebral_metastasis":
        return f"L{int(np.clip(3 - round(z / 36.0), 1, 5))} vertebral body"
    if kind == "disc_herniation":
        k = int(np.floor(z / 36.0))
        upper = int(np.clip(2 - k, 1, 4))
        return f"L{upper}-L{upper + 1} intervertebral disc"
    if kind in ("hepatic_hemangioma", "liver_metastasis"):
        return ("right" if x < -45 else "left") + " lobe of the liver"
    if kind == "renal_cyst":
        return ("upper" if z > -14 else "lower") + " pole of the " + ("left" if x > 0 else "right") + " kidney"
    return LESION_TYPES[kind].hosts[0].replace("_", " ")


def _diameter_mm(points: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Longest extent along the lesion's principal axis, plus one voxel."""
    if len(points) < 2:
        return float(max(spacing))
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[0]
    return float(proj.max() - proj.min() + np.mean(spacing))


def build_subject(plan: SubjectPlan, out: Path) -> BuiltSubject:
    """Generate one subject's image, lesion mask, region and tissue maps and report under ``out``.

    >>> built = build_subject(plan, Path("demo/data"))
    """
    from ..volume import write_volume
    from ...storage import atomic_write_text

    rng = np.random.default_rng(plan.seed)
    anatomy = _anatomy_for(plan, rng)
    if anatomy.probabilities:
        image_src = synthesize_brain(anatomy.probabilities, anatomy.real_t1, anatomy.brain_weight, plan.sequence)
    else:
        image_src = synthesize_from_labels(anatomy.tissue, plan.sequence)
        image_src = ndi.gaussian_filter(image_src, 0.6)  # painted edges are too sharp for MRI
    grid, plane = _choose_acquisition(plan.body_region, anatomy, rng)
    lo, hi = anatomy.foreground_bounds_mm(margin=0.0)
    deformation = Deformation.random(rng, centre=0.5 * (lo + hi))
    coords = deformation.source_coordinates(grid, anatomy.affine_lps)

    lesion: PastedLesion | None = None
    mask = np.zeros(grid.shape, np.uint8)
    if plan.lesion_type is not None:
        for _attempt in range(5):  # a lesion at the very edge can fall outside the field of view
            lesion = paste_lesion(anatomy, plan.lesion_type, rng)
            mask = resample_labels(lesion.full_mask(anatomy.tissue.shape), coords)
            if mask.any():
                break
        else:
            raise RuntimeError(f"{plan.id}: the lesion never landed inside the field of view")
        lesion.paint(image_src, plan.sequence, rng)

    image = resample_image(image_src, coords, point_spread_sigma(grid, anatomy.affine_lps))
    tissue = resample_labels(anatomy.tissue, coords)
    regions = tissue if anatomy.regions is anatomy.tissue else resample_labels(anatomy.regions, coords)
    image *= 1.0 + 0.04 * smooth_texture(grid.shape, rng)  # tissue is never perfectly flat
    image *= bias_field(grid.shape, rng, strength=rng.uniform(0.05, 0.3))
    image = rician_noise(image, rng, sigma=rng.uniform(0.008, 0.03))
    scale = rng.uniform(700.0, 1600.0)  # scanners put tissue at arbitrary absolute intensities
    image_i16 = np.clip(np.rint(image * scale), 0, 32767).astype(np.int16)

    paths = {
        "image": f"images/{plan.id}.nii.gz",
        "mask": f"masks/{plan.id}_lesion.nii.gz",
        "regions": f"regions/{plan.id}_regions.nii.gz",
        "tissue": f"tissue/{plan.id}_tissue.nii.gz" if anatomy.probabilities else f"regions/{plan.id}_regions.nii.gz",
        "report": f"reports/{plan.id}.txt",
    }
    write_volume(grid.volume(image_i16), out / paths["image"])
    write_volume(grid.volume(mask), out / paths["mask"])
    write_volume(grid.volume(regions.astype(np.uint8)), out / paths["regions"])
    if anatomy.probabilities:
        write_volume(grid.volume(tissue.astype(np.uint8)), out / paths["tissue"])

    labels: dict[str, Any] = {
        "body_region": plan.body_region,
        "sequence": plan.sequence,
        "lesion_present": 0,
        "lesion_type": "none",
        "lesion_volume_ml": 0.0,
        "lesion_region": None,
        "lesion_center_mm": None,
    }
    facts = None
    if lesion is not None:
        voxels = np.argwhere(mask > 0).astype(np.float64)
        world = (grid.affine_lps[:3, :3] @ voxels.T).T + grid.affine_lps[:3, 3]
        volume_ml = float(len(voxels) * np.prod(grid.spacing) / 1000.0)
        if anatomy.probabilities:
            label = lesion_region_label(anatomy, lesion)
            region_name = anatomy.region_names.get(label)
            location = aal_name_in_words(region_name) if region_name else "brain parenchyma"
        else:
            centre_src = anatomy.affine_lps[:3, :3] @ lesion.centre_index + anatomy.affine_lps[:3, 3]
            location = _phantom_location(lesion.kind.key, centre_src)
            region_name = location
        diameter = _diameter_mm(world, grid.spacing)
        labels.update(
            lesion_present=1,
            lesion_type=lesion.kind.key,
            lesion_volume_ml=round(volume_ml, 4),
            lesion_region=region_name,
            lesion_location=location,
            lesion_diameter_mm=round(diameter, 1),
            lesion_center_mm=[round(float(v), 2) for v in world.mean(axis=0)],
            lesion_signal=signal_words(lesion.kind, plan.sequence, lesion.host),
        )
        facts = LesionFacts(
            kind=lesion.kind.key,
            words=lesion.kind.words,
            location=location,
            diameter_mm=diameter,
            volume_ml=volume_ml,
            signal=labels["lesion_signal"],
            rim_words=lesion.kind.rim_words,
            pathologies=lesion.kind.pathologies,
        )
    report = write_report(plan.body_region, plan.sequence, plane, grid.spacing, facts, rng)
    atomic_write_text(out / paths["report"], report)

    real = anatomy.name in BRAIN_TEMPLATES
    generated = {
        "anatomy": (f"real {anatomy.name} template, randomly deformed" if real else "procedural phantom (not real anatomy)"),
        "intensities": (
            "real T1 template intensities" if real and plan.sequence == "T1"
            else f"synthetic {plan.sequence}-like contrast from tissue maps"
        ) + ", with simulated bias field and noise",
        "lesion": f"synthetic {lesion.kind.key}" if lesion is not None else None,
        "report": "generated from templates and radiology-semantic-dict finding phrases",
        "regions": "real AAL atlas carried through the same deformation" if real else "phantom tissue labels",
    }
    region_set = "aal" if real else plan.body_region
    row = {
        "id": plan.id,
        "image": paths["image"],
        "report": paths["report"],
        "body_region": plan.body_region,
        "sequence": plan.sequence,
        "mask": paths["mask"],
        "regions": paths["regions"],
        "split": plan.split,
        "study_id": f"demo-{plan.id}",
        "labels": labels,
        "generated": generated,
        "tissue": paths["tissue"],
        "region_labels": f"regions/{region_set}_labels.csv",
        "tissue_labels": "tissue/tissue_labels.csv",
        "source_anatomy": anatomy.name,
        "acquisition": {
            "plane": plane,
            "orientation": grid.code,
            "spacing_mm": list(grid.spacing),
            "slice_thickness_mm": grid.spacing[2],
            "shape": list(grid.shape),
        },
    }
    return BuiltSubject(row=row, region_names=anatomy.region_names)
