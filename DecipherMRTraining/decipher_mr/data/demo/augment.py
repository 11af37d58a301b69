"""Turning one anatomy into many subjects: acquisition grids, deformation, resampling, bias field, noise.

A subject is made by *pulling* every output voxel back into the source anatomy: output index ->
world (the grid's own orientation and spacing) -> elastic + affine deformation -> source world ->
source index -> ``scipy.ndimage.map_coordinates``. Images use linear interpolation after a Gaussian
pre-filter that imitates the acquisition's point spread (in-plane resolution and slice thickness);
label maps use nearest neighbour through *the same* coordinates, so labels and image stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume

_AXIS_OF_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def direction_from_code(code: str) -> np.ndarray:
    """LPS direction matrix (columns = where i, j, k point) from an ITK-style code.

    ``"LPS"`` is the identity; ``"RAS"`` is what most NIfTI writers use; ``"PIL"`` is a sagittal stack
    with i towards posterior, j towards inferior and slices k towards the patient's left.

    >>> direction_from_code("RAS")[:, 0]
    array([-1.,  0.,  0.])
    """
    if len(code) != 3 or {_AXIS_OF_LETTER[c][0] for c in code.upper()} != {0, 1, 2}:
        raise ValueError(f"bad orientation code {code!r}: need one of L/R, P/A, S/I each")
    direction = np.zeros((3, 3))
    for col, letter in enumerate(code.upper()):
        axis, sign = _AXIS_OF_LETTER[letter]
        direction[axis, col] = sign
    return direction


@dataclass
class AcquisitionGrid:
    """Where the output voxels are: shape, spacing along i/j/k, direction (LPS columns), origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray
    code: str

    @property
    def affine_lps(self) -> np.ndarray:
        aff = np.eye(4)
        aff[:3, :3] = self.direction @ np.diag(self.spacing)
        aff[:3, 3] = self.origin
        return aff

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, spacing=self.spacing, origin=tuple(self.origin), direction=self.direction)

    def spacing_along_world(self) -> np.ndarray:
        """Voxel size along world x, y, z (the grid is axis-aligned)."""
        out = np.zeros(3)
        for col in range(3):
            out[int(np.argmax(np.abs(self.direction[:, col])))] = self.spacing[col]
        return out


def grid_covering(lo: np.ndarray, hi: np.ndarray, spacing: tuple[float, float, float], code: str) -> AcquisitionGrid:
    """The smallest grid with the given orientation and spacing that covers the world box [lo, hi].

    >>> grid = grid_covering(np.array([-90., -120, -70]), np.array([90., 90, 100]), (2., 2., 4.), "LPS")
    """
    direction = direction_from_code(code)
    shape, origin = [0, 0, 0], np.zeros(3)
    for col in range(3):
        axis = int(np.argmax(np.abs(direction[:, col])))
        sign = direction[axis, col]
        extent = float(hi[axis] - lo[axis])
        n = max(1, int(np.ceil(extent / spacing[col])))
        shape[col] = n
        centre = 0.5 * (lo[axis] + hi[axis])
        # Centre the grid on the box so rounding up the voxel count adds margin on both sides.
        origin[axis] = centre - sign * 0.5 * (n - 1) * spacing[col]
    return AcquisitionGrid(tuple(shape), tuple(float(s) for s in spacing), direction, origin, code)


@dataclass
class Deformation:
    """Affine (rotation, anisotropic scale, shift about ``centre``) plus a smooth elastic displacement."""

    centre: np.ndarray
    matrix: np.ndarray  # 3x3, output world -> source world about the centre
    shift: np.ndarray
    elastic_waves: np.ndarray | None  # (n, 7): wave vector (3), phase, displacement amplitude (3) in mm

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        centre: np.ndarray,
        max_rotation_deg: float = 10.0,
        scale_range: tuple[float, float] = (0.92, 1.08),
        max_shift_mm: float = 5.0,
        elastic_mm: float = 3.0,
        elastic_waves: int = 4,
    ) -> "Deformation":
        """A random deformation drawn from ``rng``.

        >>> d = Deformation.random(np.random.default_rng(0), centre=np.zeros(3))
        """
        angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        scale = np.diag(rng.uniform(*scale_range, 3))
        shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
        waves = None
        if elastic_mm > 0 and elastic_waves > 0:
            # Plane waves with 50-120 mm wavelength: smooth, cheap to evaluate anywhere, and a sum
            # of a few of them bends anatomy the way inter-subject variation does (no folding at 3 mm).
            dirs = rng.standard_normal((elastic_waves, 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            wavenumber = 2 * np.pi / rng.uniform(50.0, 120.0, elastic_waves)
            phase = rng.uniform(0, 2 * np.pi, elastic_waves)
            amplitude = rng.standard_normal((elastic_waves, 3)) * elastic_mm / np.sqrt(elastic_waves)
            waves = np.concatenate([dirs * wavenumber[:, None], phase[:, None], amplitude], axis=1)
        return cls(np.asarray(centre, float), rz @ ry @ rx @ scale, shift, waves)

    def source_coordinates(self, grid: AcquisitionGrid, source_affine_lps: np.ndarray) -> np.ndarray:
        """Source voxel coordinates (3, *grid.shape) float32 for every output voxel."""
        idx = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
        aff = grid.affine_lps
        world = aff[:3, :3].astype(np.float32) @ idx + aff[:3, 3:4].astype(np.float32)
        if self.elastic_waves is not None:
            displaced = world.copy()
            for wave in self.elastic_waves.astype(np.float32):
                s = np.sin(wave[:3] @ world + wave[3])
                displaced += wave[4:7, None] * s[None, :]
            world = displaced
        centre = self.centre.astype(np.float32)[:, None]
        src_world = self.matrix.astype(np.float32) @ (world - centre) + centre + self.shift.astype(np.float32)[:, None]
        to_index = np.linalg.inv(source_affine_lps).astype(np.float32)
        coords = to_index[:3, :3] @ src_world + to_index[:3, 3:4]
        return coords.reshape((3, *grid.shape))


def point_spread_sigma(grid: AcquisitionGrid, source_affine_lps: np.ndarray) -> np.ndarray:
    """Gaussian sigma (in source voxels, per source axis) for the acquisition's resolution.

    A voxel of size s has a point spread of FWHM ~ s; the source already has its own resolution,
    so only the difference (in quadrature) is added. Thick slices get the full slab blur, which is
    what makes them look like thick slices and not like thin ones with gaps.

    >>> point_spread_sigma(grid, anat.affine_lps)
    """
    src_spacing = np.linalg.norm(source_affine_lps[:3, :3], axis=0)
    world_spacing = grid.spacing_along_world()
    sigma = np.zeros(3)
    for src_axis in range(3):
        world_axis = int(np.argmax(np.abs(source_affine_lps[:3, src_axis])))
        fwhm = np.sqrt(max(0.0, world_spacing[world_axis] ** 2 - src_spacing[src_axis] ** 2))
        sigma[src_axis] = fwhm / 2.355 / src_spacing[src_axis]
    return sigma


def resample_image(source: np.ndarray, coords: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Blur with the acquisition's point spread, then linearly interpolate at ``coords``."""
    blurred = ndi.gaussian_filter(source.astype(np.float32, copy=False), sigma, mode="constant") if np.any(sigma > 0.05) else source
    return ndi.map_coordinates(blurred, coords, order=1, mode="constant", cval=0.0, prefilter=False)


def resample_labels(source: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling at ``coords``: labels stay integral and match the image."""
    return ndi.map_coordinates(source, coords, order=0, mode="constant", cval=0, prefilter=False)


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative intensity non-uniformity (receive-coil sensitivity), mean about 1.

    A random quadratic polynomial over the field of view: as smooth as real coil profiles and far
    cheaper than upsampling a random grid.

    >>> img *= bias_field(img.shape, np.random.default_rng(0), strength=0.2)
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    c = rng.uniform(-1.0, 1.0, 9).astype(np.float32)
    field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z
    field = field + c[6] * (x * x - 0.33) + c[7] * (y * y - 0.33) + c[8] * (z * z - 0.33)
    field /= max(1e-6, float(np.abs(field).max()))
    return np.exp(strength * field).astype(np.float32)


def rician_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude-image noise: |signal + complex Gaussian| (Rician, biased upward in the background)."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)
