"""What the module's buttons do, without Qt: snapshot the input, run the engine off the GUI thread, and
put the answer into the scene all-or-nothing.

``DecipherMR.py``'s Logic is a thin shell around this class, so a script (or a test) drives exactly what
the panel drives.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from .EngineResults import apply_anomaly, apply_grounding, apply_retrieval, apply_segmentation
from .HeatmapDisplay import set_foreground_opacity, threshold_to_segment
from .RetrievalTables import load_case, retrieval_row
from .Runner import InferenceRunner
from .VolumeBridge import volume_from_node


class ModuleLogic:
    """The module's behaviour on a given scene.

    In Slicer's Python console (or a script on slicer-core)::

        logic = ModuleLogic(slicer.mrmlScene)
        logic.configure("demo/bundle.zip", device="cpu", index="demo/index")
        logic.segment(slicer.util.getNode("MRHead")); logic.runner.wait()
        logic.query(slicer.util.getNode("MRHead"), "lesion in the left frontal lobe"); logic.runner.wait()
    """

    def __init__(self, scene, engine_factory: Callable[..., object] | None = None) -> None:
        self.scene = scene
        self.runner = InferenceRunner(scene)
        self._engine_factory = engine_factory
        self._engine = None
        self._config: tuple | None = None
        self.lastHeatmap = None
        self.lastTable = None
        self._querySegmentations: dict[str, object] = {}  # input node id -> its queries' segmentation

    # --- configuration -------------------------------------------------------------------------
    def configure(self, bundle: str, device: str = "auto", index: str | None = None, engine: str = "local",
                  port: int | None = None, identity: str | None = None, remote_command: str | None = None,
                  ssh_config: str | None = None) -> None:
        """Choose the bundle, device, retrieval index and where the engine runs; a change restarts the
        engine on next use.

        ``engine`` is ``"local"`` (a worker process on this machine) or ``user@host`` (the worker started on a
        GPU server through ssh; ``port``, ``identity`` (a private key file) and ``remote_command`` (default
        ``decipher-mr``, ``ssh_config`` an ``ssh -F`` file) as needed. For a remote engine, ``bundle`` and
        ``index`` are paths on the server: nothing checks them on this machine; :meth:`engineInfo` says what
        the server loaded.

        >>> logic.configure("/srv/models/bundle.zip", device="cuda", engine="alice@gpu-server", identity="~/.ssh/id_ed25519")
        """
        from decipher_mr.inference.transport import EngineTarget

        if not bundle:
            raise ValueError("choose a model bundle (a folder or a .zip) first")
        target = EngineTarget.parse(engine, port=port or None, identity=identity or None, remote_command=remote_command,
                                    ssh_config=ssh_config or None)
        config = (str(bundle), device or "auto", index or None, target)
        if config != self._config:
            self.shutdown()
            self._config = config

    @property
    def remote(self) -> bool:
        """True when the configured engine runs on another machine."""
        return self._config is not None and self._config[3].remote

    @staticmethod
    def isRemoteEngine(engine: str | None) -> bool:
        """Whether an engine setting names another machine (anything but empty or ``local``), judged without
        importing decipher_mr (the dependency check runs before it may be installed)."""
        return str(engine or "").strip().lower() not in ("", "local")

    def dependenciesReady(self, engine: str | None = None) -> bool:
        """True when this machine has what a run needs (checked without importing anything): torch and
        decipher_mr for a local engine; for a remote one (``engine`` ``user@host``, or the configured one)
        only decipher_mr's client side: the model, and torch, run on the server.

        >>> logic.dependenciesReady("alice@gpu-server")     # True on a laptop without torch
        """
        remote = self.isRemoteEngine(engine) if engine is not None else self.remote
        needed = ("decipher_mr", "numpy") if remote else ("torch", "decipher_mr")
        return all(importlib.util.find_spec(name) is not None for name in needed)

    def engine(self):
        if self._config is None:
            raise ValueError("choose a model bundle first")
        if self._engine is None:
            if self._engine_factory is not None:
                factory = self._engine_factory
            else:
                from .Engine import default_engine_factory

                factory = default_engine_factory()
            bundle, device, index, target = self._config
            if target.remote:  # only the worker engine can run elsewhere
                from .Engine import WorkerEngine

                self._engine = (factory if self._engine_factory is not None else WorkerEngine)(
                    bundle, device=device, index=index, target=target)
            else:
                self._engine = factory(bundle, device=device, index=index)
        return self._engine

    def engineInfo(self) -> dict:
        """What the running engine loaded: bundle, name, fingerprint, device, gpu, host ({} before it runs)."""
        info = getattr(self._engine, "info", None)
        return info() if callable(info) else {}

    def connect(self) -> None:
        """Start (or reach) the engine and load the bundle, without running the model; the result is
        :meth:`engineInfo`."""
        self._start("connect", lambda e, p, c: e.connect(p, c), None)

    def shutdown(self) -> None:
        """Stop the engine (the worker process exits); the next run starts it again."""
        if self.runner.busy:
            self.runner.cancel()
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # --- runs ----------------------------------------------------------------------------------
    def _start(self, name: str, call, apply) -> None:
        engine = self.engine()
        self.runner.start(name, lambda progress, cancel: call(engine, progress, cancel), apply=apply, on_cancel=engine.cancel)

    def segment(self, volume_node) -> None:
        """Segment the volume; the result becomes a segmentation node beside it."""
        volume = volume_from_node(volume_node)  # read the scene here, on the GUI thread, never in the job
        self._start("segment", lambda e, p, c: e.segment(volume, p, c), lambda r: apply_segmentation(self.scene, volume_node, r))

    def anomaly(self, volume_node, opacity: float = 0.5) -> None:
        """Anomaly heatmap over the volume (foreground of the slice views)."""
        volume = volume_from_node(volume_node)

        def apply(result):
            self.lastHeatmap = apply_anomaly(self.scene, volume_node, result, opacity=opacity)

        self._start("anomaly map", lambda e, p, c: e.anomaly(volume, p, c), apply)

    def query(self, volume_node, text: str) -> None:
        """Highlight what the text describes: a segment named after it, a markup at the peak, views jumped."""
        text = " ".join(str(text or "").split())
        if not text:
            raise ValueError("type what to look for, e.g. 'lesion in the left frontal lobe'")
        volume = volume_from_node(volume_node)
        key = volume_node.GetID()

        def apply(result):
            seg = self._querySegmentations.get(key)
            if seg is not None and seg.GetScene() is not self.scene:
                seg = None
            found = apply_grounding(self.scene, volume_node, result, query=text, segmentation_node=seg)
            self._querySegmentations[key] = found.segmentation_node

        self._start("query", lambda e, p, c: e.ground(volume, text, p, c), apply)

    def similarReports(self, volume_node, k: int = 10) -> None:
        """The reports closest to this volume, as a table node."""
        volume = volume_from_node(volume_node)

        def apply(hits):
            self.lastTable = apply_retrieval(self.scene, hits, f"{volume_node.GetName()} similar reports", volume_node)

        self._start("similar reports", lambda e, p, c: e.similar_reports(volume, p, c, k=k), apply)

    def findCases(self, text: str, reference_node=None, k: int = 10) -> None:
        """The indexed cases matching a text, as a table node."""
        text = " ".join(str(text or "").split())
        if not text:
            raise ValueError("type what cases to find")

        def apply(hits):
            self.lastTable = apply_retrieval(self.scene, hits, "Found cases", reference_node)

        self._start("find cases", lambda e, p, c: e.find_cases(text, p, c, k=k), apply)

    # --- immediate scene edits (no model work) --------------------------------------------------
    def setOpacity(self, opacity: float) -> None:
        set_foreground_opacity(self.scene, opacity)

    def thresholdToSegment(self, volume_node, threshold: float):
        if self.lastHeatmap is None or self.lastHeatmap.GetScene() is not self.scene:
            raise ValueError("compute an anomaly map first")
        return threshold_to_segment(self.scene, self.lastHeatmap, volume_node, threshold, f"anomaly ≥ {threshold:g}")

    def reportOfRow(self, row: int) -> str:
        return retrieval_row(self.lastTable, row).report

    def loadCase(self, row: int):
        return load_case(self.scene, self.lastTable, row)
