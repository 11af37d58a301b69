"""A volume is an array plus the geometry that places it in the patient.

Conventions (the README repeats them, and every layer keeps them):

* ``Volume.array`` is indexed ``[i, j, k]`` = ITK/NIfTI voxel index order, i.e. the *fastest* file
  axis first. For a NIfTI file that is exactly nibabel's ``get_fdata()`` order; SimpleITK's
  ``GetArrayFromImage`` returns ``[k, j, i]`` and is transposed here.
* World coordinates are **LPS** millimetres (ITK and DICOM convention). ``direction`` is a 3×3 matrix
  whose *columns* are the world directions of the i, j, k axes; ``origin`` is the world position of the
  centre of voxel (0, 0, 0); ``spacing`` is the voxel size along i, j, k.
* Slicer works in RAS; ``affine_ras`` gives the IJK→RAS matrix Slicer's ``IJKToRASMatrix`` expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D image with its geometry.

    >>> vol = Volume(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 3.0))
    >>> vol.affine_lps[:3, 3]
    array([0., 0., 0.])
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    path: str | None = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"{self.describe()}: expected a 3D array, got shape {self.array.shape}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"{self.describe()}: spacing must be positive, got {self.spacing}")

    def describe(self) -> str:
        return self.path or "<in-memory volume>"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 voxel-index → LPS-mm matrix."""
        aff = np.eye(4)
        aff[:3, :3] = self.direction @ np.diag(self.spacing)
        aff[:3, 3] = self.origin
        return aff

    @property
    def affine_ras(self) -> np.ndarray:
        """4×4 voxel-index → RAS-mm matrix (NIfTI sform / Slicer IJKToRAS)."""
        aff = self.affine_lps.copy()
        aff[:3, :] = LPS_TO_RAS @ aff[:3, :]
        return aff

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (the shape must match)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.shape}")
        return replace(self, array=array)

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    # --- SimpleITK bridge -------------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(self.array, (2, 1, 0))))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img, path: str | None = None) -> "Volume":
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise ValueError(f"{path or '<image>'}: expected a 3D image, got {img.GetDimension()}D")
        arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
        return cls(
            array=arr,
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=np.array(img.GetDirection()).reshape(3, 3),
            path=path,
        )


def write_volume(volume: Volume, dest: str | Path, compress: bool = True) -> Path:
    """Write a volume atomically as NIfTI, NRRD or MHA (chosen by the file ending).

    >>> write_volume(vol, "out/brain.nii.gz")
    """
    import SimpleITK as sitk

    from ..storage import atomic_path

    dest = Path(dest)
    name = dest.name.lower()
    suffix = next((s for s in (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd") if name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{dest}: unsupported output format (use .nii.gz, .nii, .nrrd or .mha)")
    with atomic_path(dest, suffix=suffix) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), compress)
    return dest


def frozen(array) -> bool:
    """True when nothing can change the array's values in place: it and every array it views are read-only
    (down to owned memory or an immutable ``bytes``). Such an array's content hash can be remembered.

    >>> a = np.zeros(3); a.flags.writeable = False; frozen(a)
    True
    """
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return False
        array = array.base
    return array is None or isinstance(array, bytes)


def freeze(array: np.ndarray) -> np.ndarray:
    """Make the array and every array it views read-only (see :func:`frozen`); returns the array."""
    node = array
    while isinstance(node, np.ndarray):
        node.flags.writeable = False
        node = node.base
    return array

