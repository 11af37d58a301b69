"""Real MRML scenes for the Slicer-side tests (slicer-core: no application, so no loadVolume)."""

from __future__ import annotations

import slicer

from decipher_mr import assets


def scene_with_slice_views():
    """A scene with the three slice views the application creates (Red, Green, Yellow)."""
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for layout, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        view = scene.CreateNodeByClass("vtkMRMLSliceNode")
        view.SetLayoutName(layout)
        scene.AddNode(view)
        view.SetOrientation(orientation)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(layout)
        scene.AddNode(composite)
    return scene


def add_colin27(scene, name: str = "Colin27"):
    """Read the real Colin27 T1 into a new scalar volume node through a storage node, as Slicer does."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(assets.colin27_t1()))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), "Colin27 could not be read"
    return node
