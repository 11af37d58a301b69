"""A pure-Python client for ``decipher-mr worker`` (no torch import: safe inside 3D Slicer's GUI).

It starts the worker subprocess, waits for its ``ready`` line, sends requests, streams progress to a
callback, cancels, and turns a worker that dies (killed, out of memory, a crash in native code)
into a :class:`WorkerCrashed` error naming the exit code and the last lines the worker wrote on
stderr. Callbacks run on the client's reader thread: a GUI hands them to its own thread.

>>> with WorkerClient("model.zip") as client:
...     handle = client.submit("ground", {"volume": "t1.nii.gz", "text": "left frontal lobe"},
...                            on_progress=lambda m: print(m["stage"], m["fraction"]))
...     result = handle.result(timeout=600)        # or handle.cancel()
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

STDERR_LINES = 40


class WorkerError(RuntimeError):
    """The worker answered a request with an error; ``code`` is the protocol's error code."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class RequestCancelled(WorkerError):
    """The request was cancelled before it finished."""


class WorkerCrashed(WorkerError):
    """The worker process ended while requests were outstanding (or before it was ready)."""


class RequestHandle:
    """One submitted request: wait for it with :meth:`result`, stop it with :meth:`cancel`."""

    def __init__(self, client: "WorkerClient", rid: str, method: str, on_progress: Callable | None):
        self.client, self.id, self.method, self.on_progress = client, rid, method, on_progress
        self._done = threading.Event()
        self._result: Any = None
        self._error: WorkerError | None = None

    def _finish(self, result: Any = None, error: WorkerError | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The request's result; raises :class:`WorkerError` (or a subclass) or ``TimeoutError``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} ({self.method}) did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        self.client.cancel(self.id)


class WorkerClient:
    """Start and talk to a worker process. Use as a context manager, or call :meth:`close`.

    ``command`` overrides how the worker is started (default: this Python, ``-m decipher_mr worker``).
    ``on_error`` receives errors that belong to no request (e.g. a line that was not JSON).
    """

    def __init__(self, bundle: str | os.PathLike, device: str = "auto", out: str | None = None,
                 extra_args: Sequence[str] = (), python: str | None = None, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 300.0,
                 on_error: Callable[[dict], None] | None = None):
        args = ["--bundle", str(bundle), "--device", device, *(["--out", str(out)] if out else []), *extra_args]
        self.command = list(command) if command else [python or sys.executable, "-m", "decipher_mr", "worker", *args]
        self.env = env
        self.start_timeout = start_timeout
        self.on_error = on_error
        self.info: dict[str, Any] = {}
        self.unmatched: list[dict] = []
        self._ids = itertools.count(1)
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._closing = False
        self._fatal: str | None = None
        self.process: subprocess.Popen | None = None

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> "WorkerClient":
        """Start the worker and wait until it has loaded the bundle."""
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, bufsize=0)
        threading.Thread(target=self._read_stdout, name="worker-client-stdout", daemon=True).start()
        threading.Thread(target=self._read_stderr, name="worker-client-stderr", daemon=True).start()
        if not self._ready.wait(self.start_timeout):
            self.kill()
            raise WorkerCrashed(f"the DecipherMR worker did not become ready within {self.start_timeout:.0f} s"
                                f"{self._stderr_tail()}")
        if self._fatal is not None or not self.info:
            raise WorkerCrashed(self._fatal or self._exit_message("before it was ready"))
        return self

    def __enter__(self) -> "WorkerClient":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (after its current request), then make sure it has."""
        if self.process is None:
            return
        self._closing = True
        if self.alive:
            try:
                self._write({"id": "shutdown", "method": "shutdown"})
                self.process.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """Stop the worker now (the running request is lost)."""
        if self.process is not None and self.alive:
            self._closing = True
            self.process.kill()
            self.process.wait()

    # --- requests -------------------------------------------------------------------------------
    def submit(self, method: str, params: dict[str, Any] | None = None,
               on_progress: Callable[[dict], None] | None = None) -> RequestHandle:
        """Send a request; returns at once with a :class:`RequestHandle`."""
        if not self.alive:
            raise WorkerCrashed(self._exit_message("before this request was sent"))
        rid = f"r{next(self._ids)}"
        handle = RequestHandle(self, rid, method, on_progress)
        with self._lock:
            self._handles[rid] = handle
        try:
            self._write({"id": rid, "method": method, "params": params or {}})
        except (BrokenPipeError, OSError) as exc:
            with self._lock:
                self._handles.pop(rid, None)
            raise WorkerCrashed(self._exit_message("while a request was being sent")) from exc
        return handle

    def request(self, method: str, params: dict[str, Any] | None = None,
                on_progress: Callable[[dict], None] | None = None, timeout: float | None = None) -> Any:
        """Send a request and wait for its result.

        >>> client.request("segment", {"volume": "t1.nii.gz"})["file"]
        """
        return self.submit(method, params, on_progress).result(timeout)

    def cancel(self, rid: str) -> None:
        """Ask the worker to cancel request ``rid``; its handle then fails with :class:`RequestCancelled`."""
        if self.alive:
            try:
                self._write({"id": f"cancel-{rid}", "method": "cancel", "params": {"target": rid}})
            except (BrokenPipeError, OSError):
                pass

    def send_line(self, line: str) -> None:
        """Write one raw line (protocol tests send malformed requests this way)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.rstrip("\n").encode("utf-8") + b"\n")
        self.process.stdin.flush()

    def _write(self, msg: dict[str, Any]) -> None:
        self.send_line(json.dumps(msg))

    # --- reading --------------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                msg = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                self._stderr.append(raw.decode("utf-8", errors="replace").rstrip())
                continue
            if isinstance(msg, dict):
                self._dispatch(msg)
        self.process.wait()
        self._fail_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.info = msg
            self._ready.set()
            return
        if kind == "fatal":
            err = msg.get("error") or {}
            self._fatal = f"the DecipherMR worker could not start: {err.get('message', 'unknown error')}"
            self._ready.set()
            return
        rid = msg.get("id")
        with self._lock:
            handle = self._handles.get(str(rid)) if rid is not None else None
        if kind == "progress":
            if handle is not None and handle.on_progress is not None:
                try:
                    handle.on_progress(msg)
                except Exception:  # a faulty callback must not kill the reader thread
                    pass
            return
        if handle is None:
            if kind == "error":
                self.unmatched.append(msg)
                if self.on_error is not None:
                    self.on_error(msg)
            return
        with self._lock:
            self._handles.pop(str(rid), None)
        if kind == "result":
            handle._finish(result=msg.get("result"))
        elif kind == "error":
            err = msg.get("error") or {}
            cls = RequestCancelled if err.get("code") == "cancelled" else WorkerError
            handle._finish(error=cls(err.get("message", "unknown error"), err.get("code", "error")))

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._stderr.append(line)

    def _stderr_tail(self) -> str:
        lines = [l for l in list(self._stderr)[-8:] if l.strip()]
        return ("; its last messages: " + " | ".join(lines)) if lines else ""

    def _exit_message(self, when: str) -> str:
        code = self.process.poll() if self.process is not None else None
        how = "was not started" if self.process is None else (
            f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}")
        return f"the DecipherMR worker {how} {when}{self._stderr_tail()}"

    def _fail_all(self) -> None:
        self._ready.set()
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            if self._closing:
                h._finish(error=WorkerError(f"the worker was closed before request {h.id} ({h.method}) finished",
                                            "closed"))
            else:
                h._finish(error=WorkerCrashed(self._exit_message(f"while handling request {h.id} ({h.method})"),
                                              "crashed"))
