"""The connection from the module to the inference engine, used from the runner's background thread.

Two backends answer the same calls (``segment``, ``anomaly``, ``ground``, ``similar_reports``,
``find_cases``, ``cancel``, ``close``), each taking ``(progress, cancel_requested)`` from the runner:

* ``WorkerEngine`` (what the module uses): the persistent ``decipher-mr worker`` process through
  ``decipher_mr.inference.client``; the model stays warm between runs and a crash of the worker is an
  error here, never a crash of Slicer.
* ``InProcessEngine``: a ``decipher_mr.inference.Session`` in this process (scripts, tests, and Slicer
  builds where a subprocess is not wanted). Cancel interrupts it at the next transformer block.

``decipher_mr`` is imported inside the methods: building the connection is what loads torch.
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

    def cancel(self) -> None:
        """Cancelling is cooperative here: the progress callback raises at the next block."""

    def close(self) -> None:
        self._session = None


def default_engine_factory():
    """The worker backend when the engine's client is installed, else the in-process one.

    >>> engine = default_engine_factory()("demo/bundle.zip", device="auto", index=None)
    """
    worker = globals().get("WorkerEngine")
    if worker is not None and importlib.util.find_spec("decipher_mr.inference.client") is not None:
        return worker
    return InProcessEngine
