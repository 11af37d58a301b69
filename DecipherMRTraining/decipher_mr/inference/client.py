"""A pure-Python client for ``decipher-mr worker`` (no torch import: safe inside 3D Slicer's GUI).

It starts the worker subprocess, waits for its ``ready`` line, sends requests, streams progress to a
callback, cancels, and turns a worker that dies (killed, out of memory, a crash in native code)
into a :class:`WorkerCrashed` error naming the exit code and the last lines the worker wrote on
stderr. Callbacks run on the client's reader thread: a GUI hands them to its own thread.

The program started may be a launcher (3D Slicer's ``PythonSlicer`` is a CTKAppLauncher that runs
the real interpreter as its child): :meth:`WorkerClient.kill` and :meth:`WorkerClient.close` stop the
whole process tree (psutil when installed, else the worker's own process group on POSIX and
``taskkill /T`` on Windows), and the tree is killed when this process exits.

>>> with WorkerClient("model.zip") as client:
...     handle = client.submit("ground", {"volume": "t1.nii.gz", "text": "left frontal lobe"},
...                            on_progress=lambda m: print(m["stage"], m["fraction"]))
...     result = handle.result(timeout=600)        # or handle.cancel()
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import types
import weakref
from typing import Any, Callable, Sequence

STDERR_LINES = 40
PROTOCOL_VERSION = 2  # the worker protocol this client speaks (docs/worker-protocol.md); the worker's ready says its own
KILL_WAIT_S = 5.0  # how long kill() waits for the killed processes to be gone

# Win32 values (documented in the Windows API; ``subprocess`` defines these names only on Windows).
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def _popen_platform_options(platform: str = sys.platform) -> dict[str, Any]:
    """Popen keyword arguments that keep the worker windowless (Windows) and its whole tree killable (POSIX).

    >>> _popen_platform_options("linux")
    {'start_new_session': True}
    """
    if platform == "win32":
        # As slicer.util.launchConsoleProcess hides its console (STARTUPINFO, SW_HIDE), and no console
        # at all (CREATE_NO_WINDOW): a console window the user closes would kill the worker.
        startupinfo = getattr(subprocess, "STARTUPINFO", types.SimpleNamespace)(
            dwFlags=STARTF_USESHOWWINDOW, wShowWindow=SW_HIDE)
        return {"creationflags": CREATE_NO_WINDOW, "startupinfo": startupinfo}
    # A new session makes the started program lead its own process group, which a launcher's child
    # (the real interpreter) inherits: os.killpg then reaches both, even without psutil.
    return {"start_new_session": True}


def _psutil():
    """psutil when installed (it lists and kills a process's descendants), else None.

    >>> _psutil() is None      # True inside a Slicer that lacks psutil
    """
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _pgid(pid: int) -> int | None:
    """The process group of ``pid``, or None when it is gone.

    >>> _pgid(os.getpid()) == os.getpgrp()
    True
    """
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _wait_gone(psutil, procs: list, timeout: float) -> None:
    """Wait until every process has ended; a zombie has (it holds no memory, GPU or pipe), and one
    re-parented away from its launcher is reaped by whoever adopted it, maybe late.

    >>> _wait_gone(psutil, psutil.Process(launcher_pid).children(recursive=True), timeout=5)
    """
    import time

    def gone(p) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


class _ProcessTree:
    """The process ``Popen`` started (maybe a launcher) and every process below it.

    >>> tree = _ProcessTree(popen); tree.remember(worker_pid); tree.kill()
    """

    def __init__(self, popen: subprocess.Popen, platform: str = sys.platform):
        self.popen, self.platform = popen, platform
        self.worker_pid: int | None = None
        self.known: list = []  # psutil.Process of the descendants seen while the launcher lived

    def remember(self, worker_pid: Any) -> None:
        """Note the real worker's pid (from its ``ready`` line) and the descendants alive now, so they
        can be found after the launcher has gone (its children are then re-parented)."""
        self.worker_pid = worker_pid if isinstance(worker_pid, int) else None
        self.known = self._descendants()

    def _descendants(self) -> list:
        psutil = _psutil()
        if psutil is None or self.popen.returncode is not None:  # a reaped pid may be another program's now
            return []
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """Kill every process of the tree now and reap the one ``Popen`` started (idempotent)."""
        psutil = _psutil()
        procs = list({p.pid: p for p in [*self.known, *self._descendants()]}.values())
        if self.platform == "win32":
            if psutil is None:
                self._taskkill()
        else:
            self._kill_group()
        for p in procs:
            try:
                p.kill()  # psutil checks the pid still names the process it saw (no pid-reuse accident)
            except psutil.Error:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        if procs:
            _wait_gone(psutil, procs, KILL_WAIT_S)

    def _kill_group(self) -> None:
        """SIGKILL the process group ``start_new_session`` created, if a member shows it still exists.

        >>> tree._kill_group()      # POSIX only
        """
        pgid = self.popen.pid
        # an unreaped launcher, or the worker, still in the group proves the group id is still ours
        members = [self.worker_pid, pgid if self.popen.returncode is None else None]
        if any(pid is not None and _pgid(pid) == pgid for pid in members):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _taskkill(self) -> None:
        """Windows without psutil: ``taskkill /T`` ends the launcher and its children (while it lives).

        >>> tree._taskkill()        # Windows only
        """
        if self.popen.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.popen.pid)], capture_output=True,
                           creationflags=CREATE_NO_WINDOW, timeout=30, check=False)


class WorkerError(RuntimeError):
    """The worker answered a request with an error; ``code`` is the protocol's error code."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class RequestCancelled(WorkerError):
    """The request was cancelled before it finished."""


class WorkerCrashed(WorkerError):
    """The worker process ended while requests were outstanding (or before it was ready)."""


class ProtocolMismatch(WorkerError):
    """The worker speaks another protocol version than this client (a different decipher-mr version)."""


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
    ``target`` (a :class:`~decipher_mr.inference.transport.EngineTarget` with a host) starts the worker on
    that host through ``ssh``; its exit codes and messages then become plain explanations (host unreachable,
    key refused, ``decipher-mr`` missing there, connection dropped).
    """

    def __init__(self, bundle: str | os.PathLike, device: str = "auto", out: str | None = None,
                 extra_args: Sequence[str] = (), python: str | None = None, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 300.0,
                 on_error: Callable[[dict], None] | None = None, target=None):
        args = ["--bundle", str(bundle), "--device", device, *(["--out", str(out)] if out else []), *extra_args]
        self.target = target if target is not None and getattr(target, "remote", False) else None
        if command:
            self.command = list(command)
        elif self.target is not None:
            self.command = self.target.command(str(bundle), device, [*(["--out", str(out)] if out else []), *extra_args])
        else:
            self.command = [python or sys.executable, "-m", "decipher_mr", "worker", *args]
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
        self._stopped = False
        self._fatal: str | None = None
        self._write_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._tree: _ProcessTree | None = None
        self.process: subprocess.Popen | None = None

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> "WorkerClient":
        """Start the worker and wait until it has loaded the bundle."""
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, bufsize=0, **_popen_platform_options())
        self._tree = _ProcessTree(self.process)
        # If this process exits (Slicer closes) with the worker still running, take its tree along.
        weakref.finalize(self, self._tree.kill)
        self._threads = [threading.Thread(target=self._read_stdout, name="worker-client-stdout", daemon=True),
                         threading.Thread(target=self._read_stderr, name="worker-client-stderr", daemon=True)]
        for thread in self._threads:
            thread.start()
        if not self._ready.wait(self.start_timeout):
            self.kill()
            raise WorkerCrashed(f"the DecipherMR worker did not become ready within {self.start_timeout:.0f} s"
                                f"{self._stderr_tail()}")
        if self._fatal is not None or not self.info:
            self.kill()
            raise WorkerCrashed(self._fatal or self._exit_message("before it was ready"))
        theirs = self.info.get("protocol")
        if theirs != PROTOCOL_VERSION:
            self.kill()
            where = f"on {self.target.label()}" if self.target is not None else "here"
            raise ProtocolMismatch(
                f"the DecipherMR engine {where} speaks worker protocol {theirs} (decipher-mr "
                f"{self.info.get('version', 'before 0.1')}); this side speaks protocol {PROTOCOL_VERSION}: install the "
                "same decipher-mr version on both machines", "protocol_mismatch")
        return self

    def __enter__(self) -> "WorkerClient":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """True while the started program runs and the client has not stopped it."""
        return self.process is not None and not self._stopped and self.process.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (after its current request); after ``timeout`` s kill its whole tree.

        >>> client.close(timeout=5)
        """
        if self.process is None:
            return
        self._closing = True
        if self.alive:
            try:
                self._write({"id": "shutdown", "method": "shutdown"})
            except (OSError, ValueError):
                pass
            self._close_stdin()  # the worker also exits when its stdin reaches EOF
            try:
                self.process.wait(timeout)
                self._threads[0].join(timeout)  # the reader hands out results still in the pipe first
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # after a clean exit this only sweeps up a launcher's child that outlived it

    def kill(self) -> None:
        """Stop the worker and every process it started, now; outstanding requests fail with code ``closed``.

        >>> client.kill(); client.alive
        False
        """
        if self.process is None or self._tree is None:
            return
        self._closing = self._stopped = True
        self._tree.kill()
        self._close_stdin()
        # Fail the handles here rather than wait for the reader's EOF: a descendant that could not be
        # killed would hold the stdout pipe open and leave them waiting forever.
        self._fail_all()

    def _close_stdin(self) -> None:
        """Close the worker's stdin (it exits at EOF); ``client._close_stdin()``."""
        # A write stuck on a full pipe (a hung worker) holds the lock: give up rather than hang with it.
        if not self._write_lock.acquire(timeout=1.0):
            return
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass
        finally:
            self._write_lock.release()

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
        except (OSError, ValueError) as exc:  # ValueError: stdin closed by kill() meanwhile
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
            except (OSError, ValueError):
                pass

    def send_line(self, line: str) -> None:
        """Write one raw line (protocol tests send malformed requests this way)."""
        assert self.process is not None and self.process.stdin is not None
        with self._write_lock:  # whole lines only: the GUI thread's cancel may write meanwhile
            self.process.stdin.write(line.rstrip("\n").encode("utf-8") + b"\n")
            self.process.stdin.flush()

    def _write(self, msg: dict[str, Any]) -> None:
        self.send_line(json.dumps(msg))

    # --- reading --------------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        # buffered: an unbuffered pipe's readline reads one byte per system call, far too slow for the
        # megabytes of an in-band map (protocol 2)
        for raw in io.BufferedReader(self.process.stdout, buffer_size=1 << 20):
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
            if self._tree is not None:  # a remote worker's pid is a process on another machine
                self._tree.remember(None if self.target is not None else msg.get("pid"))
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
        if self.target is not None:
            stderr_reader = self._threads[1] if len(self._threads) > 1 else None
            if stderr_reader is not None and stderr_reader is not threading.current_thread():
                stderr_reader.join(2.0)  # ssh's last words (refused key, unreachable host) come on stderr
            explained = self.target.explain(code, list(self._stderr), bool(self.info), when)
            if explained:
                return explained
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
