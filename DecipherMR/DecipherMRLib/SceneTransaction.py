"""Run a block of scene edits all-or-nothing: a failed or cancelled run leaves the scene as it was.

Nodes added inside the block are removed on rollback (display, storage and colour nodes included); nodes
that existed before and that the block may change are snapshotted with ``protect`` (slice composite
nodes, which the heatmap display changes, are protected automatically) and copied back.
"""

from __future__ import annotations


def _node_ids(scene) -> list[str]:
    nodes = scene.GetNodes()
    return [nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())]


class SceneTransaction:
    """Context manager: rolls the scene back when the block raises (cancellation included).

    >>> with SceneTransaction(scene) as tx:
    ...     tx.protect(existing_segmentation)
    ...     write_segmentation(scene, input_node, labels, table)
    """

    def __init__(self, scene, protect=()) -> None:
        self.scene = scene
        self._before: set[str] = set()
        self._snapshots: list[tuple[object, object]] = []
        self._initial_protect = list(protect)
        self.rolled_back = False

    def __enter__(self) -> "SceneTransaction":
        self._before = set(_node_ids(self.scene))
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(composites.GetNumberOfItems()):
            self.protect(composites.GetItemAsObject(i))
        for node in self._initial_protect:
            self.protect(node)
        return self

    def protect(self, node) -> None:
        """Snapshot an existing node now, so rollback restores it.

        >>> tx.protect(segmentation_node)
        """
        if node is None or node.GetID() not in self._before or any(n is node for n, _ in self._snapshots):
            return
        backup = node.CreateNodeInstance()
        backup.Copy(node)
        self._snapshots.append((node, backup))

    def added_nodes(self) -> list:
        """Nodes added since the block began, in the order they were added.

        >>> [n.GetName() for n in tx.added_nodes()]
        """
        return [self.scene.GetNodeByID(i) for i in _node_ids(self.scene) if i not in self._before]

    def rollback(self) -> None:
        """Remove what the block added and restore what it changed."""
        # Children (display/storage nodes) come after their data node, so removing in reverse order
        # never leaves a dangling reference behind.
        for node in reversed(self.added_nodes()):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        for node, backup in reversed(self._snapshots):
            name = node.GetName()
            node.Copy(backup)
            node.SetName(name)
        self.rolled_back = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False  # the caller still sees the error (or the cancellation) and reports it
