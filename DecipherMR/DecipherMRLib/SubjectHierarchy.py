"""Placing outputs beside their input in the subject hierarchy.

The Slicer application creates subject-hierarchy items for new nodes through its plugin logic; a bare
MRML scene does not, so the item is created here when it is missing. Either way the output ends up a
sibling of the input (same patient/study folder), which is where a user looks for it.
"""

from __future__ import annotations


def place_beside(scene, node, reference_node) -> int:
    """Make ``node`` a sibling of ``reference_node`` in the subject hierarchy; returns the item id.

    >>> place_beside(scene, segmentation_node, input_volume_node)
    """
    sh = scene.GetSubjectHierarchyNode()
    ref_item = sh.GetItemByDataNode(reference_node)
    if not ref_item:
        ref_item = sh.CreateItem(sh.GetSceneItemID(), reference_node)
    parent = sh.GetItemParent(ref_item) or sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)
    return item


def sibling_parent(scene, node) -> int:
    """The subject-hierarchy parent item of a node (0 when it has no item).

    >>> sibling_parent(scene, heat_node) == sibling_parent(scene, input_volume_node)
    """
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    return sh.GetItemParent(item) if item else 0
