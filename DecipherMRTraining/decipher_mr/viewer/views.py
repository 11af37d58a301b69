"""How the viewer's Slicer views are made: trame-slicer's view gutters plus a marker per view.

>>> register_rca_factories(view_manager, server, slice_view_ui_f=slice_view_ui, three_d_view_ui_f=threed_view_ui)
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_vtk():
    """Silence VTK's warnings for a block (creating views prints VTK 9.6 deprecation notes that mean
    nothing to a user); errors outside the block are shown as usual."""
    from vtkmodules.vtkCommonCore import vtkObject

    previous = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(previous)


def view_marker(view) -> None:
    """An element ``#dmr-view-<tag>`` inside each view, so scripts and tests can find a view by name."""
    from trame.widgets import html

    html.Div(id=f"dmr-view-{view.get_singleton_tag()}", classes="dmr-view-marker", style="display: none;")


def slice_view_ui(server, view_id, view) -> None:
    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

    view_marker(view)
    view.set_visible_in_3d(True)  # the 3D view shows where the slices are
    create_vertical_slice_view_gutter_ui(server, view_id, view)


def threed_view_ui(server, view_id, view) -> None:
    from trame_slicer.app.ui import create_vertical_view_gutter_ui

    view_marker(view)
    create_vertical_view_gutter_ui(server, view_id, view)
