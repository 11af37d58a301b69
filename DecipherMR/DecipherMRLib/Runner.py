"""Model work off the GUI thread: Idle -> Running -> Cancelling -> Idle, with progress and all-or-nothing results.

A *job* is a function ``work(progress, cancel_requested) -> result`` run on a background thread; it talks
to the persistent inference worker through the ``decipher_mr`` client and calls ``progress(fraction,
message)`` as it goes. The optional ``apply(result)`` puts the result into the scene: it runs on the
caller's (GUI) thread inside a ``SceneTransaction``, so a failure there leaves the scene as it was, and a
cancelled job never reaches it. Nothing here emits from the background thread: events queue up and
``poll()`` (a QTimer in the widget, a loop in tests) delivers them.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import traceback
from typing import Any, Callable

from .SceneTransaction import SceneTransaction
from .Signals import Signal

log = logging.getLogger("DecipherMR")

ProgressFn = Callable[[float, str], None]
Work = Callable[[ProgressFn, threading.Event], Any]


class RunState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


class RunCancelled(RuntimeError):
    """A job may raise this when it notices the cancel request (any exception after a cancel counts as one)."""


class InferenceRunner:
    """Runs one job at a time off the GUI thread and reports through signals on the polling thread.

    >>> runner = InferenceRunner(scene)
    >>> runner.finished.connect(lambda name, result: print(name, "done"))
    >>> runner.start("segment", lambda progress, cancel: client.segment(volume), apply=put_in_scene)
    >>> while runner.poll(): time.sleep(0.05)        # the widget polls from a QTimer instead
    """

    def __init__(self, scene=None) -> None:
        self.scene = scene
        self.state = RunState.IDLE
        self.stateChanged = Signal()  # (RunState)
        self.progress = Signal()  # (fraction 0..1, message)
        self.finished = Signal()  # (job name, result)
        self.failed = Signal()  # (job name, short message, details)
        self.cancelled = Signal()  # (job name)
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._job = ""
        self._apply: Callable[[Any], Any] | None = None
        self._on_cancel: Callable[[], None] | None = None
        # Called on the job's thread after each event is queued, so a loop that can be woken from another
        # thread (the viewer's asyncio loop) delivers it at once instead of at its next poll.
        self.notify: Callable[[], None] | None = None

    @property
    def busy(self) -> bool:
        return self.state is not RunState.IDLE

    def _set_state(self, state: RunState) -> None:
        if state is not self.state:
            self.state = state
            self.stateChanged.emit(state)

    def start(self, name: str, work: Work, apply: Callable[[Any], Any] | None = None, on_cancel: Callable[[], None] | None = None) -> None:
        """Start a job; ``on_cancel`` (called on this thread) tells the worker to stop, e.g. ``client.cancel``.

        >>> runner.start("anomaly", job, apply=show_heatmap, on_cancel=client.cancel)
        """
        if self.busy:
            raise RuntimeError(f"DecipherMR is busy with {self._job!r}; wait for it or cancel it first")
        self._job, self._apply, self._on_cancel = name, apply, on_cancel
        self._cancel = threading.Event()
        self._events = queue.Queue()
        self._set_state(RunState.RUNNING)
        events, cancel, notify = self._events, self._cancel, self.notify

        def put(event: tuple) -> None:
            events.put(event)
            if notify is not None:
                try:
                    notify()
                except Exception:  # e.g. the loop already closed: poll() still finds the event
                    pass

        def report(fraction: float, message: str = "") -> None:
            put(("progress", (max(0.0, min(1.0, float(fraction))), str(message))))

        def body() -> None:
            try:
                result = work(report, cancel)
            except BaseException as exc:  # the thread must always report back, whatever happened
                put(("error", (exc, traceback.format_exc())))
            else:
                put(("result", result))

        self._thread = threading.Thread(target=body, name=f"DecipherMR-{name}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the running job to stop; the scene is left untouched (``cancelled`` follows from ``poll``)."""
        if self.state is not RunState.RUNNING:
            return
        self._cancel.set()
        self._set_state(RunState.CANCELLING)
        if self._on_cancel is not None:
            try:
                self._on_cancel()
            except Exception:  # a worker already gone cannot be cancelled; the job will report that
                log.exception("DecipherMR: cancelling %s failed", self._job)

    def poll(self) -> bool:
        """Deliver queued events on this thread; returns True while a job is still running.

        >>> timer.timeout.connect(runner.poll)
        """
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return self.busy
            if kind == "progress":
                self.progress.emit(*payload)
            elif kind == "result":
                self._finish_with_result(payload)
            else:
                self._finish_with_error(*payload)

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> RunState:
        """Poll until the job ends (for scripts and tests; the GUI never blocks like this).

        >>> runner.wait(timeout=60)
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self._job!r} still running after {timeout} s")
            time.sleep(interval)
        return self.state

    def _finish_with_result(self, result: Any) -> None:
        name = self._job
        if self._cancel.is_set():  # a result that arrives after Cancel is dropped, not half-applied
            self._end()
            self.cancelled.emit(name)
            return
        try:
            if self._apply is not None:
                if self.scene is not None:
                    with SceneTransaction(self.scene):
                        self._apply(result)
                else:
                    self._apply(result)
        except Exception as exc:
            self._end()
            self._report_failure(name, exc, traceback.format_exc())
            return
        self._end()
        self.finished.emit(name, result)

    def _finish_with_error(self, exc: BaseException, details: str) -> None:
        name = self._job
        self._end()
        if self._cancel.is_set() or isinstance(exc, RunCancelled) or type(exc).__name__ == "Cancelled":
            self.cancelled.emit(name)
        else:
            self._report_failure(name, exc, details)

    def _report_failure(self, name: str, exc: BaseException, details: str) -> None:
        message = str(exc) or type(exc).__name__
        log.error("DecipherMR %s failed: %s\n%s", name, message, details)
        self.failed.emit(name, message, details)

    def _end(self) -> None:
        self._thread = None
        self._set_state(RunState.IDLE)
