"""Procedural knee, lumbar-spine and abdomen phantoms with tissue labels (generated, not real anatomy).

Each phantom is painted from simple solids (ellipsoids, cylinders, capsules, wedges) in LPS
millimetres on a regular source grid, with proportions drawn per subject from ``rng`` so no two
phantoms are the same. Paint order matters: later tissues overwrite earlier ones (fat, then muscle,
then organs, bones, cartilage...). They are crude on purpose: enough structure that the encoders see
bone/soft-tissue/fluid contrast and organ layout that changes with the body region.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .anatomy import SourceAnatomy
from .contrast import TISSUE_VALUE, TISSUES

T = TISSUE_VALUE


class _Canvas:
    """World coordinates of a source grid as broadcastable axes, and the label array painted on it."""

    def __init__(self, lo: tuple[float, float, float], hi: tuple[float, float, float], spacing: float):
        self.spacing = float(spacing)
        self.lo = np.asarray(lo, float)
        n = [int(round((b - a) / spacing)) + 1 for a, b in zip(lo, hi)]
        self.x = (lo[0] + spacing * np.arange(n[0], dtype=np.float32))[:, None, None]
        self.y = (lo[1] + spacing * np.arange(n[1], dtype=np.float32))[None, :, None]
        self.z = (lo[2] + spacing * np.arange(n[2], dtype=np.float32))[None, None, :]
        self.labels = np.zeros(n, np.uint8)

    @property
    def affine_lps(self) -> np.ndarray:
        aff = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        aff[:3, 3] = self.lo
        return aff

    def ellipsoid(self, centre, radii) -> np.ndarray:
        (cx, cy, cz), (rx, ry, rz) = centre, radii
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.z - cz) / rz) ** 2 <= 1.0

    def cylinder_z(self, centre_xy, radii_xy, z_range=(-np.inf, np.inf)) -> np.ndarray:
        (cx, cy), (rx, ry) = centre_xy, radii_xy
        disc = ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0
        return disc & (self.z >= z_range[0]) & (self.z <= z_range[1])

    def box(self, lo, hi) -> np.ndarray:
        return (
            (self.x >= lo[0]) & (self.x <= hi[0]) & (self.y >= lo[1]) & (self.y <= hi[1]) & (self.z >= lo[2]) & (self.z <= hi[2])
        )

    def capsule(self, a, b, radius) -> np.ndarray:
        """Points within ``radius`` of the segment a-b (ligaments, tendons)."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        ab = b - a
        t = ((self.x - a[0]) * ab[0] + (self.y - a[1]) * ab[1] + (self.z - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d2 = (self.x - a[0] - t * ab[0]) ** 2 + (self.y - a[1] - t * ab[1]) ** 2 + (self.z - a[2] - t * ab[2]) ** 2
        return d2 <= radius * radius

    def paint(self, where: np.ndarray, tissue: str, only_on: tuple[str, ...] | None = None) -> None:
        where = np.broadcast_to(where, self.labels.shape)
        if only_on is not None:
            where = where & np.isin(self.labels, [T[n] for n in only_on])
        self.labels[where] = T[tissue]

    def paint_bone(self, bone: np.ndarray, cortex_mm: float = 2.0) -> None:
        """Cortical shell around fatty marrow."""
        bone = np.broadcast_to(bone, self.labels.shape)
        marrow = ndi.binary_erosion(bone, iterations=max(1, int(round(cortex_mm / self.spacing))))
        self.labels[bone] = T["cortical_bone"]
        self.labels[marrow] = T["bone_marrow"]

    def anatomy(self, name: str, body_region: str) -> SourceAnatomy:
        names = {v: TISSUES[v][0] for v in np.unique(self.labels).tolist()}
        return SourceAnatomy(
            name=name,
            body_region=body_region,
            affine_lps=self.affine_lps,
            tissue=self.labels,
            regions=self.labels,
            region_names=names,
            lesion_space=self.labels > 0,
            synthetic=True,
        )


def knee_phantom(rng: np.random.Generator) -> SourceAnatomy:
    """A right-ish knee: femur, tibia, patella, cartilage, menisci, cruciates, tendons, muscle, fat.

    >>> knee = knee_phantom(np.random.default_rng(0)); sorted(knee.region_names.values())[:3]
    """
    s = rng.uniform(0.9, 1.1)
    c = _Canvas((-72, -72, -92), (72, 72, 92), 1.0)
    joint = -7.0 * s
    c.paint(c.cylinder_z((0, 0), (64 * s, 58 * s)), "fat")
    c.paint(c.cylinder_z((0, 4 * s), (56 * s, 50 * s)), "muscle")
    c.paint(c.ellipsoid((0, -30 * s, 40 * s), (22 * s, 4, 12 * s)), "joint_fluid")  # suprapatellar recess
    c.paint(c.cylinder_z((rng.uniform(-4, 4), 36 * s), (4, 4)), "vessel_flow_void")  # popliteal artery
    c.paint(c.capsule((0, -40 * s, 2 * s), (0, -34 * s, -32 * s), 3.5), "meniscus_ligament")  # patellar tendon
    c.paint(c.capsule((0, -38 * s, 42 * s), (0, -28 * s, 85), 4.5), "meniscus_ligament")  # quadriceps tendon
    gap = rng.uniform(5.0, 7.0)
    femur = (
        c.cylinder_z((0, 0), (14 * s, 14 * s), (25 * s, np.inf))
        | c.ellipsoid((0, 0, 30 * s), (34 * s, 26 * s, 22 * s))
        | c.ellipsoid((-20 * s, 4 * s, joint + gap / 2 + 20 * s), (17 * s, 26 * s, 20 * s))
        | c.ellipsoid((20 * s, 4 * s, joint + gap / 2 + 20 * s), (17 * s, 26 * s, 20 * s))
    )
    tibia = (
        c.ellipsoid((0, 3 * s, joint - gap / 2 - 14 * s), (36 * s, 28 * s, 14 * s))
        | c.ellipsoid((0, 2 * s, joint - 40 * s), (26 * s, 22 * s, 25 * s))
        | c.cylinder_z((0, -2 * s), (15 * s, 14 * s), (-np.inf, joint - 30 * s))
    )
    patella = c.ellipsoid((0, -42 * s, 22 * s), (22 * s, 8 * s, 19 * s))
    bones = femur | tibia | patella
    c.paint_bone(bones)
    near_joint = np.abs(c.z - joint) < 22 * s
    cartilage = ndi.binary_dilation(bones, iterations=2) & ~bones & near_joint
    c.paint(cartilage, "cartilage", only_on=("muscle", "fat", "joint_fluid"))
    for side in (-20 * s, 20 * s):
        r = np.sqrt((c.x - side) ** 2 + (c.y - 3 * s) ** 2)
        wedge = (r >= 10 * s) & (r <= 20 * s) & (np.abs(c.z - joint) <= 3.5 * (r - 9 * s) / (11 * s))
        c.paint(wedge, "meniscus_ligament", only_on=("muscle", "fat", "cartilage"))
    c.paint(c.capsule((8 * s, 8 * s, joint + 9), (-3 * s, -8 * s, joint - 4), 3.5), "meniscus_ligament", only_on=("muscle", "cartilage"))
    c.paint(c.capsule((-6 * s, -5 * s, joint + 10), (0, 14 * s, joint - 6), 3.5), "meniscus_ligament", only_on=("muscle", "cartilage"))
    return c.anatomy("knee-phantom", "knee")


def spine_phantom(rng: np.random.Generator) -> SourceAnatomy:
    """Lumbar spine: five vertebrae with marrow, discs (annulus, nucleus), canal, conus, muscles, vessels.

    >>> spine = spine_phantom(np.random.default_rng(1))
    """
    s = rng.uniform(0.92, 1.08)
    c = _Canvas((-66, -62, -100), (66, 86, 100), 1.0)
    curve = rng.uniform(6.0, 16.0)  # lordosis: the column bows anteriorly at mid-lumbar level
    yc = c.y + curve * (1.0 - (c.z / 100.0) ** 2)  # y relative to the bowed axis
    c.paint(((c.x / 64) ** 2 + ((c.y - 14) / 72) ** 2) <= 1.0, "fat")
    c.paint(c.y < -22, "bowel", only_on=("fat",))
    c.paint(((c.x / 40) ** 2 + ((c.y + 36) / 6) ** 2) <= 1.0, "fat", only_on=("bowel",))  # mesenteric fat band
    for side in (-1, 1):
        c.paint((((c.x - side * 22 * s) / 18) ** 2 + ((yc - 56 * s) / 20) ** 2) <= 1.0, "muscle")  # erector spinae
        c.paint((((c.x - side * 31 * s) / 12) ** 2 + ((yc - 4) / 13) ** 2 <= 1.0) & (c.z < 60), "muscle")  # psoas
    c.paint((((c.x - 10) / 10) ** 2 + ((yc + 28) / 10) ** 2) <= 1.0, "vessel_flow_void")  # aorta
    c.paint((((c.x + 16) / 9) ** 2 + ((yc + 27) / 8) ** 2) <= 1.0, "vessel_flow_void")  # inferior vena cava
    pitch = rng.uniform(34.0, 38.0)
    bone = np.zeros(c.labels.shape, bool)
    disc_levels = []
    for k in range(-2, 3):
        zc = k * pitch
        body_half = 0.37 * pitch
        slab = np.abs(c.z - zc) <= body_half
        bone |= ((c.x / (22 * s)) ** 2 + (yc / (17 * s)) ** 2 <= 1.0) & slab
        arch = np.abs(c.z - zc) <= 0.28 * pitch
        ring = ((c.x / 16) ** 2 + ((yc - 28 * s) / 14) ** 2 <= 1.0) & arch
        spinous = (np.abs(c.x) <= 4) & (yc >= 38 * s) & (yc <= 68 * s) & arch
        transverse = (np.abs(c.x) <= 44 * s) & (yc >= 22 * s) & (yc <= 30 * s) & (np.abs(c.z - zc) <= 5)
        bone |= ring | spinous | transverse
        disc_levels.append(zc + pitch / 2)
    c.paint_bone(bone)
    for zd in disc_levels[:-1]:
        half = 0.13 * pitch
        annulus = ((c.x / (22 * s)) ** 2 + (yc / (17 * s)) ** 2 <= 1.0) & (np.abs(c.z - zd) <= half)
        c.paint(annulus, "disc_annulus")
        c.paint(((c.x / (13 * s)) ** 2 + ((yc + 1) / (9 * s)) ** 2 <= 1.0) & (np.abs(c.z - zd) <= 0.7 * half), "disc_nucleus")
    canal = (c.x / 10) ** 2 + ((yc - 28 * s) / 9) ** 2 <= 1.0
    c.paint(canal, "csf")
    c.paint(((c.x / 5) ** 2 + ((yc - 28 * s) / 4.5) ** 2 <= 1.0) & (c.z > rng.uniform(-30, 0)), "spinal_cord")
    return c.anatomy("spine-phantom", "spine")


def abdomen_phantom(rng: np.random.Generator) -> SourceAnatomy:
    """Upper abdomen: liver, spleen, kidneys, aorta/IVC, vertebra, muscles, bowel and fat.

    >>> abdomen = abdomen_phantom(np.random.default_rng(2))
    """
    s = rng.uniform(0.9, 1.1)
    c = _Canvas((-162, -120, -84), (162, 120, 84), 1.5)
    c.paint(((c.x / (150 * s)) ** 2 + (c.y / (105 * s)) ** 2) <= 1.0, "fat")
    c.paint(((c.x / (138 * s)) ** 2 + (c.y / (94 * s)) ** 2) <= 1.0, "muscle")
    c.paint(((c.x / (130 * s)) ** 2 + (c.y / (87 * s)) ** 2) <= 1.0, "bowel")
    liver_r = np.array([70, 68, 58]) * s * rng.uniform(0.9, 1.1, 3)
    c.paint(c.ellipsoid((-58 * s, -5 * s, 28), liver_r) & (c.x < 25 * s), "liver", only_on=("bowel",))
    c.paint(c.ellipsoid((88 * s, 42 * s, 36), (28 * s, 24 * s, 42)), "spleen", only_on=("bowel",))
    for side in (-1, 1):
        centre = (side * 64 * s, 50 * s, -14 + side * rng.uniform(-8, 8))
        c.paint(c.ellipsoid(centre, (24 * s, 19 * s, 48)), "kidney", only_on=("bowel", "liver"))
        c.paint(c.ellipsoid((centre[0] - side * 10, centre[1] - 3, centre[2]), (8, 7, 24)), "fat", only_on=("kidney",))
        c.paint((((c.x - side * 30 * s) / 12) ** 2 + ((c.y - 46 * s) / 14) ** 2 <= 1.0) & (c.z < 0), "muscle")  # psoas
        c.paint((((c.x - side * 30 * s) / 22) ** 2 + ((c.y - 86 * s) / 18) ** 2) <= 1.0, "muscle")  # paraspinal
    c.paint((((c.x - 12) / 11) ** 2 + ((c.y - 30 * s) / 11) ** 2) <= 1.0, "vessel_flow_void")  # aorta
    c.paint((((c.x + 22) / 11) ** 2 + ((c.y - 28 * s) / 9) ** 2) <= 1.0, "vessel_flow_void")  # IVC
    vertebra = ((c.x / 22) ** 2 + ((c.y - 60 * s) / 18) ** 2 <= 1.0) | (
        ((c.x / 17) ** 2 + ((c.y - 84 * s) / 15) ** 2 <= 1.0) & ~((c.x / 9) ** 2 + ((c.y - 84 * s) / 8) ** 2 <= 1.0)
    )
    c.paint_bone(vertebra, cortex_mm=3.0)
    c.paint((c.x / 9) ** 2 + ((c.y - 84 * s) / 8) ** 2 <= 0.8, "csf")
    return c.anatomy("abdomen-phantom", "abdomen")


PHANTOMS = {"knee": knee_phantom, "spine": spine_phantom, "abdomen": abdomen_phantom}
