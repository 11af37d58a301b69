"""The viewer page: Slicer's views in the middle, the DecipherMR panel on the left.

Every control has an ``id`` (``dmr-…``) so that people can script the page and the browser tests can
find it. Enter in a text field runs its action, like the Slicer module's line edits.
"""

from __future__ import annotations

ENTER = [("keydown_enter", "keydown.enter")]
DISCLAIMER = "Research tool, not a medical device: never use it for clinical decisions."


def build_ui(app, title: str = "DecipherMR"):
    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    server = app.server
    ctrl = server.controller
    with VAppLayout(server, full_height=True, theme="dark") as layout:
        with v.VAppBar(density="compact", elevation=1):
            v.VAppBarNavIcon(click="dmr_drawer = !dmr_drawer", id="dmr-drawer-toggle")
            html.Div(title, classes="text-h6 mr-4", style="user-select: none;", id="dmr-title")
            html.Span("{{ dmr_model_info }}", classes="text-caption text-grey", id="dmr-model-info")
            v.VSpacer()
            _upload_buttons(app)
            html.Span("Research use only", classes="text-caption text-amber mx-3", title=DISCLAIMER)

        with v.VNavigationDrawer(v_model=("dmr_drawer", True), width=400, permanent=True, id="dmr-panel"):
            with html.Div(classes="pa-2 d-flex flex-column", style="gap: 8px;"):
                _status(app)
                _model_card(app)
                _volume_card(app)
                _analyse_card(app)
                _ask_card(app)
                _retrieval_card(app)
                _scene_card(app)

        with v.VMain():
            with html.Div(classes="d-flex flex-row fill-height", style="height: calc(100vh - 48px - 24px);", id="dmr-views"):
                app.layout_manager.initialize_layout_grid(layout)

        with v.VFooter(app=True, height=24, classes="py-0 text-caption"):
            v.VProgressCircular(indeterminate=("!!trame__busy || dmr_busy",), size=14, width=2, classes="mr-2")
            html.Span("DecipherMR viewer on Slicer's MRML scene (trame-slicer). " + DISCLAIMER, classes="text-grey")
    ctrl.dmr_configure = app.configure
    return layout


def _upload_buttons(app):
    """Open Files / Open Directory: sent to the server in chunks by trame-slicer's chunk loader
    (``window.load_files_by_chunks``), to :meth:`ViewerApp.receive_upload_chunk`, which counts the bytes
    as they arrive. Files over the limit are refused here first, before anything is sent."""
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    server = app.server
    chunk = server.trigger_name(app.receive_upload_chunk)
    too_large = server.trigger_name(app.upload_too_large)
    for name, directory, icon, busy, field_id in (
        ("Open Files", False, "mdi-file-upload", "dmr_uploading_files", "dmr-upload-files"),
        ("Open Directory", True, "mdi-folder-upload", "dmr_uploading_dir", "dmr-upload-dir"),
    ):
        change = (
            f"(Array.from($event.target.files || []).reduce((n, f) => n + f.size, 0) > dmr_max_upload)"
            f" ? trame.trigger('{too_large}', [Array.from($event.target.files).reduce((n, f) => n + f.size, 0)])"
            f" : ({busy} = true, window.load_files_by_chunks($event.target.files, {{ trigger_name: '{chunk}' }})"
            f".finally(() => {{ {busy} = false; }}))"
        )
        with html.Div(classes="d-flex justify-center", style="width: 50px; height: 50px;", title=name, id=field_id):
            v.VFileInput(v_if=(f"!{busy}",), change=change, prepend_icon=icon, multiple=not directory,
                         hide_input=True, raw_attrs=["webkitdirectory"] if directory else [])
            v.VProgressCircular(v_else=True, indeterminate=True, size=24)


def _action_field(model: str, label: str, action, field_id: str, icon: str | None = None, **kwargs):
    """A compact text field whose Enter (and its icon, if any) runs ``action``."""
    from trame.widgets import vuetify3 as v

    def on_enter(typed=None):
        # The key event can reach the server before the v-model update of the last keystrokes: take the
        # text as it stood at Enter (seen as an empty path when typing and Enter came close together).
        owner = getattr(action, "__self__", None)
        if isinstance(typed, str) and owner is not None:
            owner.state[model] = typed
        return action()

    extra = {"append_inner_icon": icon, "click_appendInner": action} if icon else {}
    return v.VTextField(v_model=(model,), label=label, density="compact", hide_details=True, id=field_id,
                        __events=ENTER, keydown_enter=(on_enter, "[$event.target.value]"), **extra, **kwargs)


def _card(title: str, icon: str, **kwargs):
    from trame.widgets import vuetify3 as v

    card = v.VCard(variant="tonal", density="compact", **kwargs)
    with card:
        v.VCardTitle(title, prepend_icon=icon, classes="text-subtitle-1 py-1")
    return card


def _status(app):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    with html.Div(id="dmr-status-area"):
        with html.Div(v_if=("dmr_busy",), id="dmr-progress", classes="mb-1"):
            html.Div("{{ dmr_job }}: {{ dmr_message }}", classes="text-body-2")
            with html.Div(classes="d-flex align-center", style="gap: 8px;"):
                v.VProgressLinear(model_value=("dmr_progress",), height=8, rounded=True, color="primary",
                                  indeterminate=("dmr_progress <= 0",))
                v.VBtn("Cancel", size="small", variant="outlined", color="warning", click=app.cancel, id="dmr-cancel")
        v.VAlert(
            v_if=("dmr_error",),
            type="error",
            density="compact",
            closable=True,
            text=("dmr_error",),
            click_close="dmr_error = ''",
            id="dmr-error",
            classes="mb-1",
        )
        html.Div("{{ dmr_status }}", classes="text-body-2 text-grey-lighten-1", id="dmr-status")


def _model_card(app):
    from trame.widgets import vuetify3 as v

    with _card("Model", "mdi-package-variant", id="dmr-model-card"):
        with v.VCardText(classes="pb-1"):
            _action_field("dmr_bundle", "Model bundle (folder or .zip on the server)", app.configure, "dmr-bundle",
                          classes="mb-2")
            _action_field("dmr_index", "Retrieval index folder (optional)", app.configure, "dmr-index", classes="mb-2")
            with v.VRow(dense=True, align="center"):
                with v.VCol(cols=6):
                    v.VSelect(v_model=("dmr_device",), items=("['auto', 'cpu', 'cuda']",), label="Device",
                              density="compact", hide_details=True, id="dmr-device")
                with v.VCol(cols=6):
                    v.VBtn("Use this model", block=True, click=app.configure, id="dmr-configure",
                           disabled=("dmr_busy",))


def _volume_card(app):
    from trame.widgets import vuetify3 as v

    with _card("Volume", "mdi-cube-scan", id="dmr-volume-card"):
        with v.VCardText(classes="pb-1"):
            _action_field("dmr_volume_path", "Image file or DICOM folder on the server", app.load_volume,
                          "dmr-volume-path", icon="mdi-folder-open", classes="mb-2")
            v.VSelect(v_model=("dmr_volume_id",), items=("dmr_volumes",), label="Input volume", density="compact",
                      hide_details=True, id="dmr-volume-select", no_data_text="no volume loaded")


def _analyse_card(app):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    idle = "dmr_busy || !dmr_configured || !dmr_volume_id"
    with _card("Segment and anomalies", "mdi-brain", id="dmr-analyse-card"):
        with v.VCardText(classes="pb-1"):
            with v.VRow(dense=True):
                with v.VCol(cols=6):
                    v.VBtn("Segment", block=True, prepend_icon="mdi-shape", click=app.segment, disabled=(idle,), id="dmr-segment")
                with v.VCol(cols=6):
                    v.VBtn("Anomaly map", block=True, prepend_icon="mdi-fire", click=app.anomaly, disabled=(idle,), id="dmr-anomaly")
            with html.Div(classes="d-flex align-center mt-2", style="gap: 8px;"):
                html.Span("Overlay opacity", classes="text-caption", style="min-width: 96px;")
                v.VSlider(v_model=("dmr_opacity",), min=0, max=1, step=0.05, hide_details=True, density="compact",
                          disabled=("!dmr_has_heatmap",), id="dmr-opacity", thumb_label=True)
            with html.Div(classes="d-flex align-center", style="gap: 8px;"):
                v.VSlider(v_model=("dmr_threshold",), min=0, max=1, step=0.05, hide_details=True, density="compact",
                          label="Threshold", disabled=("!dmr_has_heatmap",), id="dmr-threshold", thumb_label=True)
                v.VBtn("To segment", size="small", click=app.threshold_to_segment,
                       disabled=("!dmr_has_heatmap || dmr_busy",), id="dmr-threshold-to-segment")


def _ask_card(app):
    from trame.widgets import vuetify3 as v

    with _card("Ask", "mdi-text-search", id="dmr-ask-card"):
        with v.VCardText(classes="pb-1"):
            _action_field("dmr_query", "Describe what to highlight, then press Enter", app.query, "dmr-query",
                          icon="mdi-keyboard-return", placeholder="lesion in the left frontal lobe",
                          disabled=("dmr_busy || !dmr_configured || !dmr_volume_id",))


def _retrieval_card(app):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    with _card("Similar reports and cases", "mdi-file-search", id="dmr-retrieval-card"):
        with v.VCardText(classes="pb-1"):
            with v.VRow(dense=True, align="center"):
                with v.VCol(cols=8):
                    v.VBtn("Reports like this volume", block=True, click=app.similar_reports, id="dmr-similar",
                           disabled=("dmr_busy || !dmr_configured || !dmr_volume_id || !dmr_index",))
                with v.VCol(cols=4):
                    v.VTextField(v_model_number=("dmr_k",), type="number", label="k", density="compact", hide_details=True,
                                 min=1, max=100, id="dmr-k")
            _action_field("dmr_case_query", "Find cases by description, then press Enter", app.find_cases,
                          "dmr-find-cases", placeholder="meningioma", classes="mt-2",
                          disabled=("dmr_busy || !dmr_configured || !dmr_index",))
            html.Div("{{ dmr_hits_title }}", v_if=("dmr_hits.length",), classes="text-caption mt-2")
            with v.VList(density="compact", v_if=("dmr_hits.length",), id="dmr-hits", max_height=220,
                         style="overflow-y: auto;", bg_color="transparent"):
                v.VListItem(
                    v_for="hit in dmr_hits",
                    key="hit.row",
                    title=("`${hit.rank}. ${hit.study}  (${hit.score})`",),
                    subtitle=("hit.excerpt",),
                    active=("dmr_selected_hit === hit.row",),
                    click="dmr_selected_hit = hit.row",
                    id=("`dmr-hit-${hit.row}`",),
                    lines="two",
                )
            v.VTextarea(v_if=("dmr_selected_hit !== null",), model_value=("dmr_report",), label="Report", readonly=True,
                        auto_grow=True, max_rows=10, density="compact", hide_details=True, classes="mt-2", id="dmr-report")
            v.VBtn("Open this case", v_if=("dmr_selected_hit !== null",), block=True, classes="mt-2", click=app.open_case,
                   prepend_icon="mdi-open-in-app", id="dmr-open-case", disabled=("dmr_busy",))


def _scene_card(app):
    from trame.widgets import html
    from trame.widgets import vuetify3 as v

    with v.VExpansionPanels(variant="accordion", id="dmr-scene-card"):
        with v.VExpansionPanel(title=("`Scene (${dmr_scene.length} nodes)`",)):
            with v.VExpansionPanelText():
                with html.Div(v_for="node in dmr_scene", key="node.id", classes="text-caption"):
                    html.B("{{ node.name }}")
                    html.Span(" {{ node.type }}", classes="text-grey")
                    html.Span(" {{ node.segments ? node.segments.length + ' segments' : '' }}")
                    html.Span(" {{ node.points ? node.points.length + ' points' : '' }}")
