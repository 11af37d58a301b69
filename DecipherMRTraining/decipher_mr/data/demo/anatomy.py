"""Real brain anatomy for the demo corpus: Colin27 and MNI152 with tissue maps and AAL regions.

Both templates are read once per process into a ``SourceAnatomy`` on their native 1 mm grid; every
brain subject of the corpus is a deformed, resampled, re-contrasted copy of one of them.

* Colin27 (``ch2``): a whole head. The brain mask is ``ch2bet > 0``; CSF/GM/WM are soft
  memberships from a three-class intensity model of the real T1 inside that mask.
* MNI152 2009a: a skull-stripped brain with real grey/white-matter probability maps; CSF is what
  the brain mask holds beyond GM and WM.
* AAL (116 named regions) lives on Colin27's grid. Both templates are in MNI space, so AAL is
  carried onto MNI152 through world coordinates (nearest neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from .contrast import TISSUE_VALUE

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SourceAnatomy:
    """One anatomy on its own grid, ready to be deformed and resampled into a subject.

    ``tissue`` uses the table in ``contrast.TISSUES``; ``regions`` is AAL for brains and the tissue
    map for phantoms; ``lesion_space`` marks where a lesion may be pasted (the brain, the body).
    """

    name: str
    body_region: str
    affine_lps: np.ndarray  # 4x4 index -> LPS mm
    tissue: np.ndarray  # uint8 labels [i, j, k]
    regions: np.ndarray  # uint8/int16 labels [i, j, k]
    region_names: dict[int, str]
    lesion_space: np.ndarray  # bool
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # soft tissue maps (brain)
    real_t1: np.ndarray | None = None  # normalised so tissue means match contrast.TISSUES (brain)
    brain_weight: np.ndarray | None = None  # soft brain mask 0..1 (brain)
    synthetic: bool = False

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine_lps[:3, :3], axis=0)

    def foreground_bounds_mm(self, margin: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """World (LPS) bounding box of everything that is not background, plus a margin."""
        fg = self.tissue > 0
        lo_i, hi_i = [], []
        for axis in range(3):
            present = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
            lo_i.append(present[0])
            hi_i.append(present[-1])
        corners = np.array([[x, y, z, 1.0] for x in (lo_i[0], hi_i[0]) for y in (lo_i[1], hi_i[1]) for z in (lo_i[2], hi_i[2])])
        world = (self.affine_lps @ corners.T).T[:, :3]
        return world.min(axis=0) - margin, world.max(axis=0) + margin


def _read_nifti_lps(path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), RAS_TO_LPS @ img.affine


def _three_class_means(values: np.ndarray, iterations: int = 30) -> np.ndarray:
    """1D k-means (CSF < GM < WM) on brain intensities; initial guesses from quantiles."""
    means = np.percentile(values, [10, 50, 90]).astype(np.float64)
    sample = values[:: max(1, values.size // 400_000)].astype(np.float64)
    for _ in range(iterations):
        assign = np.argmin(np.abs(sample[:, None] - means[None, :]), axis=1)
        new = np.array([sample[assign == c].mean() if np.any(assign == c) else means[c] for c in range(3)])
        if np.allclose(new, means):
            break
        means = new
    return np.sort(means)


def _normalise_t1(t1: np.ndarray, csf: float, gm: float, wm: float) -> np.ndarray:
    """Piecewise-linear map that puts the template's CSF/GM/WM means on the contrast table's T1 values."""
    from .contrast import tissue_signal

    top = float(t1.max())
    xp = [0.0, csf, gm, wm, max(top, wm + 1e-3)]
    fp = [0.0, tissue_signal("csf", "T1"), tissue_signal("grey_matter", "T1"), tissue_signal("white_matter", "T1")]
    fp.append(fp[-1] * xp[-1] / wm)
    return np.interp(t1, xp, fp).astype(np.float32)


def _tissue_from_probabilities(probs: dict[str, np.ndarray], brain: np.ndarray, head: np.ndarray | None) -> np.ndarray:
    tissue = np.zeros(brain.shape, np.uint8)
    if head is not None:
        tissue[head] = TISSUE_VALUE["head_soft_tissue_and_skull"]
    csf, gm, wm = probs["csf"], probs["grey_matter"], probs["white_matter"]
    tissue[brain & (csf >= gm) & (csf >= wm)] = TISSUE_VALUE["csf"]
    tissue[brain & (gm > csf) & (gm >= wm)] = TISSUE_VALUE["grey_matter"]
    tissue[brain & (wm > csf) & (wm > gm)] = TISSUE_VALUE["white_matter"]
    return tissue


@lru_cache(maxsize=1)
def colin27() -> SourceAnatomy:
    """Colin27 head with soft CSF/GM/WM maps from its own intensities and real AAL regions.

    >>> anat = colin27(); anat.tissue.shape
    (181, 217, 181)
    """
    from ... import assets

    t1, affine = _read_nifti_lps(assets.colin27_t1("ch2"))
    bet, _ = _read_nifti_lps(assets.colin27_t1("ch2bet"))
    aal, aal_affine = _read_nifti_lps(assets.aal_atlas())
    if not np.allclose(affine, aal_affine, atol=1e-3):
        raise ValueError(f"{assets.aal_atlas()}: AAL is not on Colin27's grid")
    t1 = t1.astype(np.float32)
    brain = ndi.binary_fill_holes(bet > 0)
    csf_m, gm_m, wm_m = _three_class_means(t1[brain])
    # Soft memberships: Gaussian likelihoods around the three class means with a shared width.
    width = 0.35 * min(gm_m - csf_m, wm_m - gm_m)
    like = np.stack([np.exp(-0.5 * ((t1 - m) / width) ** 2) for m in (csf_m, gm_m, wm_m)])
    like[0][t1 < csf_m] = 1.0  # below the CSF mean is CSF, not "nothing"
    like[2][t1 > wm_m] = 1.0
    like /= like.sum(axis=0, keepdims=True) + 1e-6
    like *= brain[None]
    probs = {"csf": like[0], "grey_matter": like[1], "white_matter": like[2]}
    head = (t1 > 0.35 * csf_m) & ~brain
    head = ndi.binary_opening(head, iterations=1)
    weight = ndi.gaussian_filter(brain.astype(np.float32), 0.7)
    return SourceAnatomy(
        name="colin27",
        body_region="brain",
        affine_lps=affine,
        tissue=_tissue_from_probabilities(probs, brain, head),
        regions=aal.astype(np.uint8),
        region_names=dict(assets.aal_region_names()),
        lesion_space=brain,
        probabilities=probs,
        real_t1=_normalise_t1(t1, csf_m, gm_m, wm_m),
        brain_weight=weight,
    )


@lru_cache(maxsize=1)
def mni152() -> SourceAnatomy:
    """MNI152 2009a brain with its real GM/WM probability maps and AAL carried over by world position.

    >>> anat = mni152(); anat.region_names[1]
    'Precentral_L'
    """
    from ... import assets

    t1_img = assets.mni152_t1()
    gm_img, wm_img = assets.mni152_tissue()
    affine = RAS_TO_LPS @ t1_img.affine
    t1 = np.asarray(t1_img.get_fdata(), np.float32)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    wm = np.asarray(wm_img.get_fdata(), np.float32)
    if gm.shape != t1.shape or wm.shape != t1.shape:
        raise ValueError("MNI152 tissue maps are not on the T1 template's grid")
    brain = ndi.binary_fill_holes(ndi.binary_closing(t1 > 0.02, iterations=2))
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    probs = {"csf": csf, "grey_matter": gm * brain, "white_matter": wm * brain}
    csf_m = float(np.median(t1[brain & (csf > 0.8)]))
    gm_m = float(np.median(t1[brain & (gm > 0.8)]))
    wm_m = float(np.median(t1[brain & (wm > 0.9)]))

    aal, aal_affine = _read_nifti_lps(assets.aal_atlas())
    # MNI voxel -> world -> AAL voxel; nearest neighbour keeps labels integral.
    to_aal = np.linalg.inv(aal_affine) @ affine
    grid = np.indices(t1.shape, dtype=np.float32).reshape(3, -1)
    coords = to_aal[:3, :3].astype(np.float32) @ grid + to_aal[:3, 3:4].astype(np.float32)
    aal_on_mni = ndi.map_coordinates(aal.astype(np.uint8), coords, order=0, mode="constant", cval=0)
    aal_on_mni = aal_on_mni.reshape(t1.shape)
    aal_on_mni[~brain] = 0
    return SourceAnatomy(
        name="mni152",
        body_region="brain",
        affine_lps=affine,
        tissue=_tissue_from_probabilities(probs, brain, None),
        regions=aal_on_mni,
        region_names=dict(assets.aal_region_names()),
        lesion_space=brain,
        probabilities=probs,
        real_t1=_normalise_t1(t1, csf_m, gm_m, wm_m),
        brain_weight=ndi.gaussian_filter(brain.astype(np.float32), 0.7),
    )


BRAIN_TEMPLATES = {"colin27": colin27, "mni152": mni152}

# --- AAL names in words ---------------------------------------------------------------------
_AAL_WORDS = {
    "Precentral": "precentral gyrus", "Postcentral": "postcentral gyrus", "Rolandic_Oper": "Rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area", "Olfactory": "olfactory cortex", "Rectus": "gyrus rectus",
    "Insula": "insula", "Hippocampus": "hippocampus", "ParaHippocampal": "parahippocampal gyrus",
    "Amygdala": "amygdala", "Calcarine": "calcarine cortex", "Cuneus": "cuneus", "Lingual": "lingual gyrus",
    "Fusiform": "fusiform gyrus", "SupraMarginal": "supramarginal gyrus", "Angular": "angular gyrus",
    "Precuneus": "precuneus", "Paracentral_Lobule": "paracentral lobule", "Caudate": "caudate nucleus",
    "Putamen": "putamen", "Pallidum": "globus pallidus", "Thalamus": "thalamus", "Heschl": "Heschl gyrus",
    "Cingulum_Ant": "anterior cingulate gyrus", "Cingulum_Mid": "middle cingulate gyrus",
    "Cingulum_Post": "posterior cingulate gyrus", "Parietal_Sup": "superior parietal lobule",
    "Parietal_Inf": "inferior parietal lobule", "Temporal_Pole_Sup": "superior temporal pole",
    "Temporal_Pole_Mid": "middle temporal pole", "Frontal_Sup_Medial": "medial superior frontal gyrus",
    "Frontal_Med_Orb": "medial orbitofrontal gyrus",
}
_POSITION = {"Sup": "superior", "Mid": "middle", "Inf": "inferior"}
_PART = {"Orb": "orbital part", "Oper": "opercular part", "Tri": "triangular part"}
_LOBE = {"Frontal": "frontal gyrus", "Temporal": "temporal gyrus", "Occipital": "occipital gyrus"}
_ROMAN = {"1": "I", "2": "II", "3": "III", "4": "IV", "5": "V", "6": "VI", "7": "VII", "7b": "VIIb", "8": "VIII",
          "9": "IX", "10": "X"}


def aal_name_in_words(name: str) -> str:
    """Readable words for an AAL region name.

    >>> aal_name_in_words("Frontal_Sup_L")
    'left superior frontal gyrus'
    >>> aal_name_in_words("Frontal_Inf_Tri_R")
    'right inferior frontal gyrus, triangular part'
    """
    parts = name.split("_")
    side = ""
    if parts[-1] in ("L", "R"):
        side = "left " if parts[-1] == "L" else "right "
        parts = parts[:-1]
    base = "_".join(parts)
    if base in _AAL_WORDS:
        return side + _AAL_WORDS[base]
    if parts[0] == "Cerebelum":
        rest = parts[1:]
        if rest and rest[0].startswith("Crus"):
            return f"{side}cerebellar crus {_ROMAN.get(rest[0][4:], rest[0][4:])}"
        return f"{side}cerebellar lobule " + "-".join(_ROMAN.get(p, p) for p in rest)
    if parts[0] == "Vermis":
        return "cerebellar vermis lobule " + "-".join(_ROMAN.get(p, p) for p in parts[1:])
    if parts[0] in _LOBE and len(parts) >= 2 and parts[1] in _POSITION:
        words = f"{side}{_POSITION[parts[1]]} {_LOBE[parts[0]]}"
        if len(parts) >= 3 and parts[2] in _PART:
            words += f", {_PART[parts[2]]}"
        return words
    return side + base.replace("_", " ").lower()
