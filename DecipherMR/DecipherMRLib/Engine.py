"""The connection from the module to the inference engine, used from the runner's background thread.

Two backends answer the same calls (``segment``, ``anomaly``, ``ground``, ``similar_reports``,
``find_cases``, ``cancel``, ``close``), each taking ``(progress, cancel_requested)`` from the runner:

* ``WorkerEngine`` (what the module uses): the persistent ``decipher-mr worker`` process through
  ``decipher_mr.inference.client``; the model stays warm between runs and a crash of the worker is an
  error here, never a crash of Slicer. With a remote ``target`` (``user@host``) the same worker runs on
  a GPU server through ``ssh``; volumes and maps then travel in-band (``decipher_mr.inference.transport``).
* ``InProcessEngine``: a ``decipher_mr.inference.Session`` in this process (scripts, tests, and Slicer
  builds where a subprocess is not wanted). Cancel interrupts it at the next transformer block.

``decipher_mr`` is imported inside the methods. ``WorkerEngine`` only ever imports torch-free modules
(the client, ``decipher_mr.data``): torch loads in the worker process, never in Slicer's GUI process.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Callable

ProgressFn = Callable[[float, str], None]

STAGE_NAMES = {"encode": "Encoding the volume", "decode": "Running the head", "text": "Encoding the text"}


class InProcessEngine:
    """A ``Session`` held in this process.

    >>> engine = InProcessEngine("demo/bundle.zip", device="cpu")
    >>> result = engine.segment(volume, progress=lambda f, m: None, cancel=threading.Event())
    """

    def __init__(self, bundle: str, device: str = "auto", index: str | None = None) -> None:
        self.bundle, self.device, self.index = str(bundle), device, index
        self._session = None
        self._lock = threading.Lock()  # one request at a time, like the worker

    def session(self):
        if self._session is None:
            from decipher_mr.inference import Session

            self._session = Session.from_bundle(self.bundle, device=self.device)
        return self._session

    @staticmethod
    def _progress(progress: ProgressFn, cancel: threading.Event):
        from decipher_mr.inference import Cancelled

        def report(stage: str, fraction: float) -> None:
            if cancel.is_set():
                raise Cancelled(f"cancelled during {stage}")
            progress(fraction, STAGE_NAMES.get(stage, str(stage)))

        return report

    def _call(self, method: str, progress: ProgressFn, cancel: threading.Event, *args: Any, **kwargs: Any) -> Any:
        from decipher_mr.inference import Cancelled

        with self._lock:
            progress(0.0, "Loading the model bundle")
            session = self.session()
            if cancel.is_set():
                raise Cancelled("cancelled before it started")
            takes_progress = method not in ("search_text",)
            extra = {"progress": self._progress(progress, cancel)} if takes_progress else {}
            result = getattr(session, method)(*args, **kwargs, **extra)
            if cancel.is_set():
                raise Cancelled("cancelled")
            progress(1.0, "Done")
            return result

    def segment(self, volume, progress: ProgressFn, cancel: threading.Event):
        return self._call("segment", progress, cancel, volume)

    def anomaly(self, volume, progress: ProgressFn, cancel: threading.Event):
        return self._call("anomaly_map", progress, cancel, volume)

    def ground(self, volume, text: str, progress: ProgressFn, cancel: threading.Event):
        return self._call("ground", progress, cancel, volume, text)

    def similar_reports(self, volume, progress: ProgressFn, cancel: threading.Event, k: int = 10):
        return self._call("retrieve_reports", progress, cancel, volume, index=self._need_index(), k=k)

    def find_cases(self, text: str, progress: ProgressFn, cancel: threading.Event, k: int = 10):
        return self._call("search_text", progress, cancel, text, self._need_index(), k=k, space="image")

    def _need_index(self) -> str:
        if not self.index:
            raise ValueError("retrieval needs an index: choose the index folder built with `decipher-mr index build`")
        return self.index

    def info(self) -> dict:
        """What the session loaded (as the worker's ``ready``); {} before the first run."""
        if self._session is None:
            return {}
        from decipher_mr.inference.worker import engine_facts

        return {**self._session.describe(), **engine_facts(self._session)}

    def connect(self, progress: ProgressFn, cancel: threading.Event) -> dict:
        with self._lock:
            progress(0.0, "Loading the model bundle")
            self.session()
        return self.info()

    def cancel(self) -> None:
        """Cancelling is cooperative here: the progress callback raises at the next block."""

    def close(self) -> None:
        self._session = None


# How long a cancelled request may take to answer before the worker is stopped outright (a long
# native call cannot see the cancel; the next run starts a fresh worker).
CANCEL_GRACE_S = 15.0


class WorkerEngine:
    """The persistent ``decipher-mr worker`` process, through ``decipher_mr.inference.client``.

    Volumes go to the worker as NRRD files (full-precision geometry) in a private temporary folder,
    one file per distinct volume, so repeated queries on a volume send nothing new and hit the worker's
    encoder cache. Result files are read back on the runner's thread and deleted.

    >>> engine = WorkerEngine("demo/bundle.zip", device="auto", index="demo/index")
    >>> result = engine.ground(volume, "left frontal lobe", progress=lambda f, m: None, cancel=threading.Event())

    ``cancel_grace_s``: how long a cancelled request may take to answer before the worker's whole
    process tree is killed. ``target``: an ``EngineTarget`` with a host runs the worker there through
    ssh; each distinct volume is then sent once (the worker keeps the last few) and maps come back
    in-band, exactly or, with ``map_precision="float16"``, as float16.
    """

    def __init__(self, bundle: str, device: str = "auto", index: str | None = None, python: str | None = None,
                 cancel_grace_s: float = CANCEL_GRACE_S, target=None, map_precision: str = "exact",
                 worker_args=()) -> None:
        import tempfile
        from pathlib import Path

        self.bundle, self.device, self.index = str(bundle), device, index
        self.python = python
        self.target = target if target is not None and getattr(target, "remote", False) else None
        self._sent: set[str] = set()  # volume keys the current remote worker holds
        self._keys: dict = {}  # id(volume) -> (weak reference, content key) of read-only snapshots
        self.worker_args = list(worker_args)  # more `decipher-mr worker` options, e.g. ["--max-tokens", "1024"]
        self.map_precision = map_precision  # remote maps: "exact", or "float16" (smaller, error <= 2.4e-4)
        self.cancel_grace_s = float(cancel_grace_s)
        self.folder = Path(tempfile.mkdtemp(prefix="decipher-mr-slicer-"))
        self._client = None
        self._handle = None
        self._lock = threading.Lock()

    # --- the worker process ----------------------------------------------------------------------
    def client(self, progress: ProgressFn):
        from decipher_mr.inference.client import WorkerClient

        if self._client is None or not self._client.alive:
            if self._client is not None:
                self._client.kill()  # a launcher that died may leave the real worker running: stop it first
                self._client = None
            self._sent = set()
            if self.target is not None:
                progress(0.0, f"Connecting to {self.target.label()} and loading the model there")
                client = WorkerClient(self.bundle, device=self.device, target=self.target, extra_args=self.worker_args)
            else:
                progress(0.0, "Starting the DecipherMR worker and loading the model")
                client = WorkerClient(self.bundle, device=self.device, out=str(self.folder / "out"),
                                      python=self.python or worker_python(), extra_args=self.worker_args)
            client.start()  # raises with a clear message (unreachable, key refused, missing, protocol)
            self._client = client
        return self._client

    def info(self) -> dict:
        """What the running engine loaded (bundle, name, fingerprint, device, gpu, host); {} before it starts."""
        return dict(self._client.info) if self._client is not None and self._client.alive else {}

    def connect(self, progress: ProgressFn, cancel: threading.Event) -> dict:
        """Start (or reach) the engine and return :meth:`info`: the panel's Connect button."""
        with self._lock:
            self.client(progress)
        progress(1.0, "Connected")
        return self.info()

    def _key(self, volume) -> str:
        """The volume's content key, computed once per volume object (the panel hands the same read-only
        snapshot again while a node is unchanged, so a new query on it hashes nothing)."""
        import weakref

        from decipher_mr.inference.transport import volume_key

        held = self._keys.get(id(volume))
        if held is not None and held[0]() is volume:
            return held[1]
        from decipher_mr.data.volume import frozen

        key = volume_key(volume)
        if not frozen(volume.array):
            return key  # a caller's own array may change in place: hash it every time
        self._keys = {i: h for i, h in self._keys.items() if h[0]() is not None}
        self._keys[id(volume)] = (weakref.ref(volume), key)
        return key

    def _volume_file(self, volume) -> str:
        from decipher_mr.data.volume import write_volume

        path = self.folder / "in" / f"{self._key(volume)}.nrrd"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_volume(volume, path, compress=False)
        return str(path)

    def _request(self, method: str, params: dict, progress: ProgressFn, cancel: threading.Event, volume=None) -> dict:
        from decipher_mr.inference.client import RequestCancelled, WorkerError

        with self._lock:
            client = self.client(progress)
            if cancel.is_set():
                raise RequestCancelled("cancelled before it started", "cancelled")

            def on_progress(msg: dict) -> None:
                progress(float(msg.get("fraction", 0.0)), STAGE_NAMES.get(msg.get("stage"), str(msg.get("stage", ""))))

            if volume is None:
                return self._wait(client, client.submit(method, params, on_progress), cancel)
            from .EngineResults import map_grid

            params = {**params, "map_grid": map_grid()}  # maps on the model's grid: nothing resampled per query
            if self.target is None:  # private files read once: gzip would only cost time
                exchange = {"volume": self._volume_file(volume), "format": "nrrd", "compress": False}
                return self._wait(client, client.submit(method, {**params, **exchange}, on_progress), cancel)
            for attempt in (0, 1):
                ref = self._send_volume(client, volume, progress, cancel)
                try:
                    return self._wait(client, client.submit(method, {**params, "volume": ref, "inline": self.map_precision}, on_progress),
                                      cancel)
                except WorkerError as exc:  # the worker dropped it (it keeps a few): send it again, once
                    if exc.code != "unknown_volume" or attempt:
                        raise
                    self._sent.discard(ref.split(":", 1)[1])

    def _wait(self, client, handle, cancel: threading.Event):
        """The request's result; on Cancel, tell the worker, and stop it outright after the grace time."""
        import time

        from decipher_mr.inference.client import RequestCancelled

        self._handle = handle
        cancelled_at = None
        try:
            while True:
                try:
                    return handle.result(timeout=0.1)
                except TimeoutError:
                    if cancel.is_set() and cancelled_at is None:
                        cancelled_at = time.monotonic()
                        handle.cancel()
                    elif cancelled_at is not None and time.monotonic() - cancelled_at > self.cancel_grace_s:
                        client.kill()  # the whole tree (or the ssh connection): nothing goes on computing
                        raise RequestCancelled(f"the worker did not stop within {self.cancel_grace_s:g} s of the "
                                               "cancel and was stopped; the next run starts a new one", "cancelled")
        finally:
            self._handle = None

    def _send_volume(self, client, volume, progress: ProgressFn, cancel: threading.Event) -> str:
        """Send the volume to the remote worker once (it keeps it); returns the ``upload:<key>`` reference."""
        from decipher_mr.inference.transport import encode_volume

        key = self._key(volume)
        if key not in self._sent:
            progress(0.0, f"Sending the volume to {self.target.label()}")
            self._wait(client, client.submit("put_volume", {"key": key, "volume": encode_volume(volume)}), cancel)
            self._sent.add(key)
        return f"upload:{key}"

    def _read(self, path):
        import os

        from decipher_mr.data.io import read_volume

        if isinstance(path, dict):  # a map sent in-band by a remote worker
            from decipher_mr.inference.transport import decode_volume

            return decode_volume(path)

        try:
            return read_volume(path, allow_constant=True)
        finally:
            os.unlink(path)

    def _heatmap(self, answer: dict) -> dict:
        return {
            "heatmap": self._read(answer["file"]),
            "mask": self._read(answer["mask_file"]),
            "peak_ijk": answer.get("peak_ijk"),
            "threshold": answer.get("threshold"),
            "query": answer.get("query"),
        }

    # --- the calls the module makes ----------------------------------------------------------------
    def segment(self, volume, progress: ProgressFn, cancel: threading.Event) -> dict:
        answer = self._request("segment", {}, progress, cancel, volume)
        return {"labels": self._read(answer["file"]), "label_names": list(answer.get("labels", [])),
                "label_codes": answer.get("label_codes")}  # optional (an older worker sends none)

    def anomaly(self, volume, progress: ProgressFn, cancel: threading.Event) -> dict:
        return self._heatmap(self._request("anomaly", {}, progress, cancel, volume))

    def ground(self, volume, text: str, progress: ProgressFn, cancel: threading.Event) -> dict:
        return self._heatmap(self._request("ground", {"text": text}, progress, cancel, volume))

    def similar_reports(self, volume, progress: ProgressFn, cancel: threading.Event, k: int = 10) -> list:
        params = {"index": self._need_index(), "k": int(k)}
        return self._request("retrieve_reports", params, progress, cancel, volume)["hits"]

    def find_cases(self, text: str, progress: ProgressFn, cancel: threading.Event, k: int = 10) -> list:
        params = {"text": text, "index": self._need_index(), "k": int(k), "space": "image"}
        return self._request("search_text", params, progress, cancel)["hits"]

    _need_index = InProcessEngine._need_index

    def cancel(self) -> None:
        """Ask the worker to stop the running request (called on the GUI thread)."""
        handle = self._handle
        if handle is not None:
            handle.cancel()

    def close(self) -> None:
        """Stop the worker and delete the temporary files."""
        import shutil

        if self._client is not None:
            self._client.close()
            self._client = None
        shutil.rmtree(self.folder, ignore_errors=True)


def worker_python() -> str:
    """The Python that runs the inference worker: Slicer's own (PythonSlicer) or this interpreter.

    >>> worker_python()
    """
    import sys
    from pathlib import Path

    exe = Path(sys.executable)
    slicer_python = exe.with_name("PythonSlicer" + exe.suffix)
    return str(slicer_python if slicer_python.exists() else exe)


def default_engine_factory():
    """The worker backend when the engine's client is installed, else the in-process one.

    >>> engine = default_engine_factory()("demo/bundle.zip", device="auto", index=None)
    """
    return WorkerEngine if _client_installed() else InProcessEngine


def _client_installed() -> bool:
    """Whether ``decipher_mr/inference/client.py`` exists, found without importing anything.

    ``find_spec`` of a dotted name imports its parent packages; a top-level name only locates it.

    >>> _client_installed()
    True
    """
    from pathlib import Path

    spec = importlib.util.find_spec("decipher_mr")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(folder) / "inference" / "client.py").is_file() for folder in folders)
