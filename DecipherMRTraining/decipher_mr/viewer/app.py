"""The viewer application: a trame server holding a Slicer scene, its views and the DecipherMR panel.

One :class:`ViewerApp` per server process. The scene, the slice and 3D views and their rendering are
trame-slicer's (``SlicerApp`` + remote-controlled views); what the panel does is
``DecipherMRLib.ModuleLogic``, exactly as in the Slicer module; this file only wires page state to
that logic and reports back (progress, errors, results) into the page.

Threading is the module's: model work runs on the runner's background thread and the scene is only
touched on the server's event loop, where :meth:`ViewerApp.poll` delivers the runner's events (the
Slicer widget does the same from a QTimer).

>>> app = ViewerApp(bundle="demo/bundle.zip", index="demo/index", token=resolve_token(), data_roots=["demo"])
>>> app.server.start(port=8080, open_browser=False)   # open http://localhost:8080/?secret=<the token>
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from . import module_lib
from .access import DEFAULT_MAX_UPLOAD_MB, DataRoots, PathNotAllowed, TokenGate, resolve_token  # noqa: F401 (resolve_token: see the example above)
from .scene_state import hit_rows, latest_highlight, scene_summary
from .views import quiet_vtk, slice_view_ui, threed_view_ui

log = logging.getLogger("decipher_mr.viewer")

POLL_S = 0.05
LAYOUT = "Axial Primary"
SLICE_VIEWS = ("Red", "Green", "Yellow")
JOB_TITLES = {
    "segment": "Segmentation",
    "anomaly map": "Anomaly map",
    "query": "Text query",
    "similar reports": "Similar reports",
    "find cases": "Case search",
}


class ViewerApp:
    """The DecipherMR viewer on one trame server.

    ``bundle``/``index`` configure the panel at start (they can be changed in the page);
    ``volume`` is loaded once the page is ready; ``engine`` is ``"worker"`` (the persistent
    ``decipher-mr worker`` process, what the Slicer module uses) or ``"in-process"``.

    Access: ``token`` (``None``: anyone who reaches the port) is required by :class:`TokenGate` on every
    HTTP request and on the websocket; paths typed in the page must be inside ``data_roots``
    (default: the current folder and the folders of ``bundle``, ``index``, ``volume``); an upload may
    not exceed ``max_upload_bytes``.
    """

    def __init__(
        self,
        server=None,
        bundle: str | None = None,
        index: str | None = None,
        device: str = "auto",
        volume: str | None = None,
        engine: str = "worker",
        encoder: str = "turbo-jpeg",
        title: str = "DecipherMR",
        token: str | None = None,
        data_roots=None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
    ) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.lib = module_lib()
        from DecipherMRLib.Engine import InProcessEngine, WorkerEngine
        from DecipherMRLib.ModuleLogic import ModuleLogic

        self.server = server or get_server(None, client_type="vue3")
        # Access: the token (HTTP middleware + wslink hello) and the folders the page may open by path.
        self.gate = TokenGate(token, max_message_bytes=max_upload_bytes + 2**20)
        self.server.cli.set_defaults(authKey=token or "wslink-secret")  # trame's own wslink secret
        self.server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self.gate.link_protocol()))
        self.server.controller.on_server_bind.add(self.gate.bind)
        if data_roots is None:
            data_roots = [Path.cwd(), *(Path(p).expanduser().resolve().parent for p in (bundle, index, volume) if p)]
        self.data_roots = DataRoots(data_roots)
        self.max_upload_bytes = int(max_upload_bytes)
        self._upload = {"files": [], "bytes": 0, "refused": False}
        self.server.enable_module(trame_slicer_module)
        self.state = self.server.state
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=encoder,
                               slice_view_ui_f=slice_view_ui, three_d_view_ui_f=threed_view_ui)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        with quiet_vtk():  # creating views prints VTK 9.6 deprecation warnings that mean nothing to a user
            self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())

        self.target = engine if getattr(engine, "remote", False) else None  # an EngineTarget: a GPU server
        if self.target is None and engine not in ("worker", "in-process"):
            raise ValueError(f"engine must be 'worker', 'in-process' or an EngineTarget, not {engine!r}")
        factory = WorkerEngine if engine == "worker" or self.target is not None else InProcessEngine
        self.logic = ModuleLogic(self.scene, engine_factory=factory)
        self.logic.runner.progress.connect(self._on_progress)
        self.logic.runner.finished.connect(self._on_finished)
        self.logic.runner.failed.connect(self._on_failed)
        self.logic.runner.cancelled.connect(self._on_cancelled)
        self._startup_volume = volume
        self._upload_dir = tempfile.TemporaryDirectory(prefix="decipher-mr-view-")
        self._poll_task = None

        self._init_state(bundle=bundle, index=index, device=device, title=title)
        from .ui import build_ui

        self.ui = build_ui(self, title=title)
        with quiet_vtk():
            self.layout_manager.set_layout(LAYOUT)
        self.server.controller.on_server_ready.add(self._on_ready)
        self.state.change("dmr_volume_id")(self._on_volume_selected)
        self.state.change("dmr_opacity")(self._on_opacity)
        self.state.change("dmr_selected_hit")(self._on_hit_selected)
        if bundle:
            self.configure()

    # --- state -------------------------------------------------------------------------------
    def _init_state(self, bundle, index, device, title) -> None:
        s = self.state
        s.trame__title = title
        s.dmr_bundle = str(bundle or "")
        s.dmr_index = str(index or "")
        s.dmr_device = device or "auto"
        s.dmr_model_info = "No model bundle chosen yet."
        s.dmr_configured = False
        s.dmr_volume_path = ""
        s.dmr_volumes = []
        s.dmr_volume_id = None
        s.dmr_busy, s.dmr_job, s.dmr_progress, s.dmr_message = False, "", 0, ""
        s.dmr_status = "Load a volume, then segment it, map anomalies, ask a question or look for similar cases."
        s.dmr_error = ""
        s.dmr_query = ""
        s.dmr_case_query = ""
        s.dmr_k = 10
        s.dmr_opacity = 0.5
        s.dmr_has_heatmap = False
        s.dmr_threshold = 0.5
        s.dmr_hits, s.dmr_hits_title, s.dmr_selected_hit, s.dmr_report = [], "", None, ""
        s.dmr_scene = []
        s.dmr_highlight = None
        s.dmr_jobs_done = 0
        s.dmr_last_job = None
        s.dmr_max_upload = self.max_upload_bytes
        s.dmr_uploading_files = False
        s.dmr_uploading_dir = False

    def _error(self, message: str) -> None:
        with self.state:
            self.state.dmr_error = message

    def _guard(self, what: str, fn, *args, **kwargs):
        """Run a panel action; a failure becomes the page's error message, never a server crash."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the page
            log.warning("%s failed: %s", what, type(exc).__name__)
            self._error(f"{what}: {exc}")
            return None

    # --- model ----------------------------------------------------------------------------------
    def configure(self) -> None:
        """Use the bundle (and index) typed in the page; the model is loaded on the first run."""

        def do():
            bundle = self.state.dmr_bundle.strip()
            if not bundle:
                raise ValueError("type the path of a model bundle (a folder or a .zip)")
            if self.target is not None:  # paths on the GPU server: checked there when the engine starts
                index, t = self.state.dmr_index.strip() or None, self.target
                self.logic.configure(bundle, device=self.state.dmr_device, index=index, engine=t.label(), identity=t.identity,
                                     remote_command=t.remote_command, ssh_config=t.ssh_config)
                with self.state:
                    self.state.dmr_configured, self.state.dmr_error = True, ""
                    self.state.dmr_model_info = f"{bundle} on {t.label()} (loaded there on the first run)"
                return
            typed_bundle, bundle = bundle, str(self.data_roots.check(bundle, "model bundle"))
            if not Path(bundle).exists():
                raise FileNotFoundError(f"{typed_bundle}: no such model bundle")
            index = self.state.dmr_index.strip() or None
            if index:
                typed_index, index = index, str(self.data_roots.check(index, "retrieval index"))
                if not Path(index).exists():
                    raise FileNotFoundError(f"{typed_index}: no such retrieval index")
            from decipher_mr.bundle import verify_bundle

            report = verify_bundle(bundle)
            self.logic.configure(bundle, device=self.state.dmr_device, index=index)
            heads = ", ".join(sorted(report.get("heads", {})))
            with self.state:
                self.state.dmr_configured, self.state.dmr_error = True, ""
                self.state.dmr_model_info = (f"{report.get('name') or Path(bundle).name}: verified" + (
                    f"; heads {heads}" if heads else "") + (f"; index {Path(index).name}" if index else "; no index"))

        self._guard("Model bundle", do)

    # --- volumes ---------------------------------------------------------------------------------
    def load_volume(self, path: str | None = None, name: str | None = None, _trusted: bool = False):
        """Load a file or DICOM folder from the server's disk, show it, and make it the input.

        The path must be inside the data roots (``_trusted``: a file the viewer wrote itself, an upload)."""
        path = (path if path is not None else self.state.dmr_volume_path or "").strip()
        if not path:
            self._error("Open volume: type the path of an image file or a DICOM folder on the server")
            return None
        if not _trusted:
            allowed = self._guard("Open volume", self.data_roots.check, path, "volume")
            if allowed is None:
                return None
        node = self._guard("Open volume", self.lib.load_volume_file, self.scene, path if _trusted else str(allowed), name=name)
        if node is not None:
            self._show_volume(node, reset=True)
            with self.state:
                self.state.dmr_error = ""
                self.state.dmr_status = f"Opened {node.GetName()} ({'x'.join(map(str, node.GetImageData().GetDimensions()))} voxels)."
        return node

    # --- uploads -----------------------------------------------------------------------------------
    def upload_too_large(self, size=None) -> None:
        """The page saw that the chosen files exceed the limit and sent nothing."""
        self._error(self._upload_message(size))

    def _upload_message(self, size=None) -> str:
        limit = self.max_upload_bytes / 2**20
        got = f" ({float(size) / 2**20:.1f} MB)" if isinstance(size, (int, float)) else ""
        return (f"Upload refused: the files are larger than this viewer accepts{got}; the limit is {limit:g} MB "
                "(decipher-mr view --max-upload-mb). Copy large files to the server and type their path instead.")

    async def receive_upload_chunk(self, files: list[dict] | None = None) -> None:
        """One chunk of an upload from the page (trame-slicer's chunk loader); an empty list ends it.

        The bytes are counted as the chunks arrive: past the limit, what was received is dropped and the
        rest of the upload is ignored."""
        up = self._upload
        if files:
            if up["refused"]:
                return
            for item in files:
                content = item.get("content") if isinstance(item, dict) else None
                parts = content if isinstance(content, list) else [content]
                up["bytes"] += sum(len(p) for p in parts if isinstance(p, (bytes, bytearray, memoryview)))
            if up["bytes"] > self.max_upload_bytes:
                self._upload = {"files": [], "bytes": up["bytes"], "refused": True}
                self._error(self._upload_message(up["bytes"]))
                return
            up["files"].extend(files)
            return
        received, refused = up["files"], up["refused"]
        self._upload = {"files": [], "bytes": 0, "refused": False}
        if not refused:
            self.load_uploaded(received)

    def load_uploaded(self, files: list[dict]) -> None:
        """Files sent from the browser (one image, or every file of a DICOM folder) written to a private folder."""
        from trame.app.file_upload import ClientFile

        if not files:
            return
        total = 0
        for item in files:
            content = item.get("content") if isinstance(item, dict) else None
            total += sum(len(p) for p in (content if isinstance(content, list) else [content]) if p is not None)
        if total > self.max_upload_bytes:
            self._error(self._upload_message(total))
            return
        folder = Path(tempfile.mkdtemp(dir=self._upload_dir.name))
        written = []
        for item in files:
            f = ClientFile(item)
            name = Path(str(f.name).replace("\\", "/")).name  # never a path from the client: only the base name
            if not name or name in (".", ".."):
                continue
            target = folder / name
            target.write_bytes(f.content)
            written.append(target)
        if not written:
            self._error("Upload: no file was received")
            return
        if len(written) == 1:
            self.load_volume(str(written[0]), _trusted=True)
        else:  # the files of a DICOM folder: named after the folder the user picked, when the browser says
            relative = str(files[0].get("webkitRelativePath") or files[0].get("relativePath") or "")
            self.load_volume(str(folder), name=relative.split("/")[0] if "/" in relative else "DICOM upload", _trusted=True)

    def _show_volume(self, node, reset: bool = False) -> None:
        dm = self.slicer_app.display_manager
        dm.show_volume_in_slice_background(node)
        dm.show_volume_in_slice_foreground(None)
        if reset:
            dm.reset_views()
        with self.state:
            self.state.dmr_volume_id = node.GetID()
            self.state.dmr_has_heatmap = False
        self.refresh_scene()

    def _on_volume_selected(self, dmr_volume_id=None, **_):
        node = self.scene.GetNodeByID(dmr_volume_id) if dmr_volume_id else None
        if node is None:
            return
        dm = self.slicer_app.display_manager
        for view in self.slicer_app.view_manager.get_slice_views():
            if view.get_background_volume_id() != node.GetID():
                dm.show_volume_in_slice_background(node)
                break
        self.render()

    def input_node(self):
        node = self.scene.GetNodeByID(self.state.dmr_volume_id) if self.state.dmr_volume_id else None
        if node is None:
            raise ValueError("load a volume first (a file or DICOM folder, or upload one)")
        return node

    # --- model actions -----------------------------------------------------------------------------
    def _start(self, what: str, fn) -> None:
        if self.logic.runner.busy:
            self._error(f"{what}: DecipherMR is busy with another job; wait for it or cancel it")
            return
        if not self.state.dmr_configured:
            self._error(f"{what}: choose a model bundle first")
            return

        def begin():
            fn()
            with self.state:
                self.state.dmr_error = ""
                self.state.dmr_busy = True
                self.state.dmr_job = what
                self.state.dmr_progress = 0
                self.state.dmr_message = "Starting"

        self._guard(what, begin)

    def segment(self) -> None:
        self._start("Segmentation", lambda: self.logic.segment(self.input_node()))

    def anomaly(self) -> None:
        self._start("Anomaly map", lambda: self.logic.anomaly(self.input_node(), opacity=float(self.state.dmr_opacity)))

    def query(self) -> None:
        text = self.state.dmr_query
        self._start("Text query", lambda: self.logic.query(self.input_node(), text))

    def similar_reports(self) -> None:
        self._start("Similar reports", lambda: self.logic.similarReports(self.input_node(), k=int(self.state.dmr_k)))

    def find_cases(self) -> None:
        text = self.state.dmr_case_query
        node = self.scene.GetNodeByID(self.state.dmr_volume_id) if self.state.dmr_volume_id else None
        self._start("Case search", lambda: self.logic.findCases(text, reference_node=node, k=int(self.state.dmr_k)))

    def cancel(self) -> None:
        self.logic.runner.cancel()
        with self.state:
            self.state.dmr_message = "Cancelling"

    def threshold_to_segment(self) -> None:
        def do():
            self.logic.thresholdToSegment(self.input_node(), float(self.state.dmr_threshold))
            self.refresh_scene()
            with self.state:
                self.state.dmr_status = f"Anomaly map at or above {float(self.state.dmr_threshold):g} added as a segment."

        self._guard("Threshold to segment", do)

    def _on_opacity(self, dmr_opacity=None, **_):
        if dmr_opacity is not None and self.state.dmr_has_heatmap:
            self._guard("Opacity", self.logic.setOpacity, float(dmr_opacity))
            self.render()

    def _on_hit_selected(self, dmr_selected_hit=None, **_):
        if dmr_selected_hit is None or self.logic.lastTable is None:
            return
        report = self._guard("Report", self.logic.reportOfRow, int(dmr_selected_hit))
        with self.state:
            self.state.dmr_report = report or ""

    def open_case(self) -> None:
        def do():
            row = self.state.dmr_selected_hit
            if row is None:
                raise ValueError("select a result first")
            node = self.logic.loadCase(int(row))
            self._show_volume(node, reset=True)
            with self.state:
                self.state.dmr_status = f"Opened case {node.GetName()}."

        self._guard("Open case", do)

    # --- runner feedback (on the event loop) --------------------------------------------------------
    def poll(self) -> bool:
        """Deliver the runner's events (progress, results into the scene); True while a job runs."""
        return self.logic.runner.poll()

    async def _poll_forever(self) -> None:
        wake, loop = asyncio.Event(), asyncio.get_running_loop()  # the job wakes the loop: no POLL_S wait
        self.logic.runner.notify = lambda: loop.call_soon_threadsafe(wake.set)
        while True:
            try:
                self.poll()
            except Exception:  # the loop must survive anything a job does
                log.exception("DecipherMR viewer: poll failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_S)
            wake.clear()

    def _on_ready(self, **_):
        from trame_server.utils.asynchronous import create_task

        self._poll_task = create_task(self._poll_forever())
        if self._startup_volume:
            with self.state:
                self.state.dmr_volume_path = str(self._startup_volume)
            self.load_volume(str(self._startup_volume))

    def _on_progress(self, fraction: float, message: str) -> None:
        with self.state:
            self.state.dmr_progress = round(100 * float(fraction))
            self.state.dmr_message = message

    def _job_ended(self, outcome: str, name: str, status: str) -> None:
        with self.state:
            self.state.dmr_busy = False
            self.state.dmr_progress = 0
            self.state.dmr_message = ""
            self.state.dmr_status = status
            self.state.dmr_jobs_done = int(self.state.dmr_jobs_done) + 1
            self.state.dmr_last_job = {"name": name, "outcome": outcome}
            if self.target is not None and self.logic.engineInfo():  # what the GPU server loaded
                from DecipherMRLib.PanelInputs import engine_summary

                self.state.dmr_model_info = engine_summary(self.logic.engineInfo(), self.target.label())
        self.refresh_scene()

    def _on_finished(self, name: str, result: Any) -> None:
        status = f"{JOB_TITLES.get(name, name)}: done."
        if name == "segment":
            status = "Segmentation added to the scene."
        elif name == "anomaly map":
            with self.state:
                self.state.dmr_has_heatmap = True
            status = "Anomaly map shown over the volume; adjust its opacity below."
        elif name == "query":
            self._publish_highlight()
            h = self.state.dmr_highlight
            where = ", ".join(f"{v:.0f}" for v in h["ras"]) if h else "?"
            status = f"Highlighted the region the query names; views centred at RAS ({where})."
        elif name in ("similar reports", "find cases"):
            self._publish_hits()
            status = f"{len(self.state.dmr_hits)} results; select one to read its report."
        self._job_ended("finished", name, status)

    def _on_failed(self, name: str, message: str, details: str) -> None:
        self._error(f"{JOB_TITLES.get(name, name)} failed: {message}")
        self._job_ended("failed", name, f"{JOB_TITLES.get(name, name)} failed; the scene is unchanged.")

    def _on_cancelled(self, name: str) -> None:
        self._job_ended("cancelled", name, f"{JOB_TITLES.get(name, name)} cancelled; the scene is unchanged.")

    # --- results into the page ----------------------------------------------------------------------
    def _publish_hits(self) -> None:
        table = self.logic.lastTable
        with self.state:
            self.state.dmr_hits = hit_rows(self.lib, table)
            self.state.dmr_hits_title = table.GetName() if table is not None else ""
            self.state.dmr_selected_hit = None
            self.state.dmr_report = ""

    def _publish_highlight(self) -> None:
        highlight = latest_highlight(self.scene, self.slicer_app.view_manager.get_slice_views())
        if highlight is not None:
            with self.state:
                self.state.dmr_highlight = highlight

    def refresh_scene(self) -> None:
        """Mirror the scene's data nodes into the page (the Scene list and the volume selector)."""
        items, volumes = scene_summary(self.scene)
        with self.state:
            self.state.dmr_scene = items
            self.state.dmr_volumes = volumes
        self.render()

    def render(self) -> None:
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.logic.shutdown()
        self._upload_dir.cleanup()

