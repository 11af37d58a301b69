"""Volume nodes <-> arrays with geometry.

Arrays here are indexed ``[i, j, k]`` like ``decipher_mr.data.volume.Volume`` (ITK/NIfTI order), not the
``[k, j, i]`` order of ``slicer.util.arrayFromVolume``. A node's IJKToRAS matrix is the geometry; the
engine's ``Volume`` keeps LPS, so the two differ only by the sign of the first two world rows.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# numpy dtype -> VTK scalar type for the arrays the engine returns.
_VTK_TYPES = {
    np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR,
    np.dtype(np.int8): vtk.VTK_SIGNED_CHAR,
    np.dtype(np.int16): vtk.VTK_SHORT,
    np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT,
    np.dtype(np.int32): vtk.VTK_INT,
    np.dtype(np.uint32): vtk.VTK_UNSIGNED_INT,
    np.dtype(np.float32): vtk.VTK_FLOAT,
    np.dtype(np.float64): vtk.VTK_DOUBLE,
}


def ijk_to_ras(node) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a volume node as numpy.

    >>> ijk_to_ras(volume_node)[:3, 3]        # RAS position of voxel (0, 0, 0)
    """
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_from_volume_node(node) -> np.ndarray:
    """The voxels of a volume node as a numpy view indexed ``[i, j, k]``.

    >>> array_from_volume_node(volume_node).shape     # (columns, rows, slices)
    """
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "<none>"
        raise ValueError(f"volume node {name!r} has no image data")
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; expected a scalar volume")
    # VTK stores i fastest, so the flat buffer reshapes to [k, j, i]; transposing is a free view.
    return scalars.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)


# Snapshots of unchanged volume nodes, reused: a query on the same volume neither copies its voxels again
# nor makes the engine hash them again (Engine keys a snapshot once). A few nodes, most recent last.
SNAPSHOTS_KEPT = 4
_snapshots: dict = {}  # (scene address, node id) -> (signature, Volume)


def _signature(node) -> tuple:
    """What changes when a node's voxels or geometry change: the scalars array (its identity and MTime, which
    ``slicer.util.arrayFromVolumeModified`` bumps), the image data's MTime and dimensions, IJKToRAS, name."""
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars()
    return (scalars.GetAddressAsString("vtkDataArray"), scalars.GetMTime(), image.GetMTime(), image.GetDimensions(),
            tuple(ijk_to_ras(node).ravel()), node.GetName())


def volume_from_node(node):
    """A ``decipher_mr`` Volume (array [i, j, k] + LPS geometry) from a scalar volume node: a read-only
    snapshot, the same object again while the node's voxels and geometry are unchanged.

    >>> vol = volume_from_node(slicer.util.getNode("MRHead"))
    """
    from decipher_mr.data.volume import Volume

    array = array_from_volume_node(node)
    scene = node.GetScene()
    key = (scene.GetAddressAsString("vtkMRMLScene") if scene is not None else None, node.GetID())
    signature = _signature(node) if key[1] else None
    cached = _snapshots.pop(key, None)
    if cached is not None and signature is not None and cached[0] == signature:
        _snapshots[key] = cached
        return cached[1]
    affine = ijk_to_ras(node)
    lps = _LPS_FROM_RAS @ affine[:3, :]
    spacing = np.asarray(node.GetSpacing(), dtype=np.float64)
    snapshot = np.ascontiguousarray(array)
    if snapshot is array or np.shares_memory(snapshot, array):  # a 1-slice volume: the view is contiguous
        snapshot = snapshot.copy()
    snapshot.flags.writeable = False  # shared by every run on this volume: nobody may change it in place
    volume = Volume(array=snapshot, spacing=tuple(spacing), origin=tuple(lps[:, 3]), direction=lps[:, :3] / spacing,
                    path=node.GetName())
    if signature is not None:
        _snapshots[key] = (signature, volume)
        while len(_snapshots) > SNAPSHOTS_KEPT:
            _snapshots.pop(next(iter(_snapshots)))
    return volume


def add_volume_from_decipher(scene, volume, name: str | None = None):
    """Add a ``decipher_mr`` Volume (array [i, j, k] + LPS geometry) to the scene as a scalar volume node.

    The inverse of ``volume_from_node``: the node's IJKToRAS is the volume's LPS affine with the first
    two world rows negated.

    >>> node = add_volume_from_decipher(scene, read_volume("case.nii.gz"), "case")
    """
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    direction_ras = _LPS_FROM_RAS @ np.asarray(volume.direction, dtype=np.float64)
    origin_ras = _LPS_FROM_RAS @ np.asarray(volume.origin, dtype=np.float64)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction_ras[r, c] * spacing[c])
        matrix.SetElement(r, 3, origin_ras[r])
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name or "Volume"))
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(vtk_image_from_array(volume.array))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:  # a window that shows MRI (not the full range, which a few bright voxels squash)
        low, high = np.percentile(np.asarray(volume.array, dtype=np.float32), [0.5, 99.5])
        if high > low:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(float(low), float(high))
    return node


def load_volume_file(scene, path, name: str | None = None, series_uid: str | None = None):
    """Read an MRI file (NIfTI, NRRD, MHA) or a DICOM series folder into a new scalar volume node.

    Reading goes through ``decipher_mr.data.io.read_volume``, so a 2D or 4D image, NaNs, a truncated
    file or a folder of several series is refused with a message that names the file, and the scene is
    left untouched (the node is only added once the image is known to be good).

    >>> node = load_volume_file(scene, "demo/data/images/brain-000.nii.gz")
    """
    from pathlib import Path

    from decipher_mr.data.io import read_volume

    path = Path(path).expanduser()
    volume = read_volume(path, series_uid=series_uid)
    stem = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return add_volume_from_decipher(scene, volume, name or stem or "Volume")


def vtk_image_from_array(array: np.ndarray) -> "vtk.vtkImageData":
    """A vtkImageData holding a copy of an ``[i, j, k]`` array (geometry left at identity).

    >>> image = vtk_image_from_array(np.zeros((4, 5, 6), np.uint8))
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype not in _VTK_TYPES:
        array = array.astype(np.float32)
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=1, array_type=_VTK_TYPES[flat.dtype]))
    return image


def check_same_grid(array: np.ndarray, reference_node, what: str) -> None:
    """Refuse an output whose shape is not the reference volume's (it would be placed wrongly)."""
    ref_shape = tuple(reference_node.GetImageData().GetDimensions())
    if tuple(np.shape(array)) != ref_shape:
        raise ValueError(
            f"{what}: shape {tuple(np.shape(array))} does not match volume {reference_node.GetName()!r} {ref_shape}"
        )


def add_volume_from_array(scene, array: np.ndarray, reference_node, name: str, label: bool = False):
    """Add a scalar (or label map) volume node on the reference volume's exact grid.

    >>> heat = add_volume_from_array(scene, scores, input_node, "Anomaly map")
    """
    check_same_grid(array, reference_node, name)
    node = slicer.vtkMRMLLabelMapVolumeNode() if label else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.CopyOrientation(reference_node)  # origin, spacing and directions in one go
    node.SetAndObserveImageData(vtk_image_from_array(array))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def same_geometry(node_a, node_b, atol: float = 1e-5) -> bool:
    """True when two volume nodes have the same grid and IJKToRAS.

    >>> same_geometry(heat_node, input_node)
    """
    dims_a = node_a.GetImageData().GetDimensions() if node_a.GetImageData() else None
    dims_b = node_b.GetImageData().GetDimensions() if node_b.GetImageData() else None
    return dims_a == dims_b and np.allclose(ijk_to_ras(node_a), ijk_to_ras(node_b), atol=atol)


def read_node_from_file(scene, node, storage, path, name: str, unreadable: str):
    """Add ``node`` (named ``name``) and its ``storage`` node to the scene and read ``path`` into it.

    On failure both nodes are removed again, so the scene is left as it was, and ``ValueError``
    carries ``unreadable``. Used for retrieved cases and saved segmentations alike.

    >>> read_node_from_file(scene, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(),
    ...                     path, "case-7", f"{path}: could not read the image")
    """
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(unreadable)
    node.CreateDefaultDisplayNodes()
    return node


def grid_node(shape, ijk_to_ras_matrix) -> "slicer.vtkMRMLScalarVolumeNode":
    """A volume node outside any scene that only carries a grid (dimensions + IJKToRAS), no voxels.

    Engine maps on the model's own grid are placed through it: Slicer reslices every volume and segment
    through its own IJKToRAS, so such a map shows in place over the input without being resampled.

    >>> carrier = grid_node(heat.shape, heat_volume.affine_ras); add_volume_from_array(scene, heat, carrier, "heat")
    """
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras_matrix[r][c]))
    image = vtk.vtkImageData()
    image.SetDimensions(*(int(n) for n in shape))
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image)
    return node


def nearest_ijk(node, ras) -> tuple[int, int, int]:
    """The voxel of a volume node nearest to a RAS point (clipped to its grid)."""
    ijk = np.linalg.solve(ijk_to_ras(node), np.array([*map(float, ras), 1.0]))[:3]
    dims = np.asarray(node.GetImageData().GetDimensions()) - 1
    return tuple(int(v) for v in np.clip(np.rint(ijk), 0, dims))  # type: ignore[return-value]
