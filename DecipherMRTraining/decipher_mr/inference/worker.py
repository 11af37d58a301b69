"""The persistent worker: one :class:`~decipher_mr.inference.Session` answering line-delimited JSON.

The protocol is documented in ``docs/worker-protocol.md``; in short, one JSON object per line:

* the worker says ``{"type": "ready", "protocol": 1, ...}`` once the bundle is loaded (or
  ``{"type": "fatal", "error": {...}}`` and exits 2 when it cannot load it);
* a request is ``{"id": "7", "method": "ground", "params": {"volume": "t1.nii.gz", "text": "..."}}``;
* while it runs, ``{"type": "progress", "id": "7", "stage": "encode", "fraction": 0.4}`` messages;
* then exactly one ``{"type": "result", "id": "7", "result": {...}}`` or
  ``{"type": "error", "id": "7", "error": {"code": "...", "message": "..."}}``;
* ``{"id": "8", "method": "cancel", "params": {"target": "7"}}`` stops request 7 at its next
  checkpoint (it answers with error code ``cancelled``) or drops it from the queue.

Requests run one at a time in arrival order; a reader thread keeps reading stdin meanwhile, so a
cancel is seen at once. A bad request (not JSON, unknown method, missing parameter, unreadable
volume) gets an error reply and the worker goes on serving. Nothing but protocol lines is written to
the real stdout: file descriptor 1 is pointed at stderr, so a stray print or a C library's message
cannot corrupt the stream.
"""

from __future__ import annotations

import io
import json
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import Cancelled, InferenceError

# 2: in-band volumes (put_volume, "upload:<key>" volumes) and results ("inline": true); ready says more.
PROTOCOL_VERSION = 2
UPLOADS_KEPT = 4  # volumes received in-band, most recent last (a few: the panel's open volumes)
PROGRESS_INTERVAL_S = 0.1


class BadRequest(ValueError):
    """A request the worker cannot act on (missing or wrong parameters, unknown method)."""


class UnknownVolume(LookupError):
    """An ``upload:<key>`` volume this worker does not hold (the client sends it again)."""


def engine_facts(session) -> dict[str, Any]:
    """What the panel shows about an engine besides the session: bundle name, host, GPU, package version."""
    import socket

    import decipher_mr

    facts: dict[str, Any] = {"version": decipher_mr.__version__, "host": socket.gethostname(), "gpu": None}
    config = getattr(getattr(session, "bundle", None), "config", None)
    facts["name"] = config.get("name") if isinstance(config, dict) else None
    device = str(getattr(session, "device", ""))
    if device.startswith("cuda"):
        try:
            import torch

            facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # a name is a courtesy: never fail the start-up for it
            pass
    return facts


def _param(params: dict[str, Any], name: str, kind: type | tuple = str, default: Any = ...) -> Any:
    if name not in params:
        if default is ...:
            raise BadRequest(f"missing parameter {name!r}")
        return default
    value = params[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise BadRequest(f"parameter {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


class Worker:
    """Serve requests for one session; ``out`` receives every result's files unless a request names
    its own ``out`` folder.

    >>> Worker(Session.from_bundle("model.zip"), sys.stdin, protocol_stream).serve()
    """

    def __init__(self, session, stdin: io.TextIOBase, stdout: io.TextIOBase, out: Path | None):
        self.session, self.stdin, self.stdout = session, stdin, stdout
        self.out = Path(out) if out else None  # None: a temporary folder, made when a file is first written
        self._uploads: dict[str, Any] = {}  # key -> Volume received in-band (put_volume)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._pending: set[str] = set()
        self._running: str | None = None

    # --- messages -------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, default=str, allow_nan=False)
        with self._lock:
            self.stdout.write(line + "\n")
            self.stdout.flush()

    def error(self, rid: Any, code: str, message: str) -> None:
        self.send({"type": "error", "id": rid, "error": {"code": code, "message": message}})

    # --- reading --------------------------------------------------------------------------------
    def _read(self) -> None:
        for line in self.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as exc:
                self.error(None, "invalid_json", f"request is not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(req, dict) or not isinstance(req.get("method"), str) or "id" not in req \
                    or not isinstance(req["id"], (str, int)) or isinstance(req["id"], bool):
                rid = req.get("id") if isinstance(req, dict) and isinstance(req.get("id"), (str, int)) else None
                self.error(rid, "bad_request", "a request is an object with 'id' (string or integer), 'method' "
                                               "(string) and optional 'params' (object)")
                continue
            rid = str(req["id"])
            if req["method"] == "cancel":
                params = req.get("params") if isinstance(req.get("params"), dict) else {}
                target = str(params.get("target", ""))
                with self._lock:
                    found = target == self._running or target in self._pending
                    if found:
                        self._cancelled.add(target)
                self.send({"type": "result", "id": req["id"], "result": {"target": target, "cancelled": found}})
                continue
            with self._lock:
                self._pending.add(rid)
            self._queue.put(req)
        self._queue.put(None)  # stdin closed: finish what is running, then stop

    # --- serving --------------------------------------------------------------------------------
    def serve(self) -> int:
        self.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), **self.session.describe(),
                   **engine_facts(self.session)})
        threading.Thread(target=self._read, name="worker-stdin", daemon=True).start()
        while True:
            req = self._queue.get()
            if req is None:
                return 0
            rid = str(req["id"])
            with self._lock:
                self._pending.discard(rid)
                if rid in self._cancelled:
                    self._cancelled.discard(rid)
                    skip = True
                else:
                    self._running, skip = rid, False
            if skip:
                self.error(req["id"], "cancelled", "request cancelled before it started")
                continue
            try:
                if req["method"] == "shutdown":
                    self.send({"type": "result", "id": req["id"], "result": {"shutdown": True}})
                    return 0
                result = self.handle(req["method"], req.get("params") or {}, self._progress_for(req["id"]))
                self.send({"type": "result", "id": req["id"], "result": result})
            except Cancelled:
                self.error(req["id"], "cancelled", "request cancelled")
            except UnknownVolume as exc:
                self.error(req["id"], "unknown_volume", str(exc))
            except BadRequest as exc:
                self.error(req["id"], "bad_request", str(exc))
            except (InferenceError, ValueError, FileNotFoundError) as exc:
                # ValueError covers unreadable volumes (VolumeReadError), bad bundles and index refusals
                self.error(req["id"], type(exc).__name__, str(exc))
            except Exception as exc:  # an engine bug must not take the warm session down
                traceback.print_exc(file=sys.stderr)
                self.error(req["id"], "internal", f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._running = None
                    self._cancelled.discard(rid)

    def _progress_for(self, rid: Any) -> Callable[[str, float], None]:
        state = {"t": 0.0, "stage": None}
        key = str(rid)

        def progress(stage: str, fraction: float) -> None:
            if key in self._cancelled:
                raise Cancelled(key)
            now = time.monotonic()
            if stage != state["stage"] or now - state["t"] >= PROGRESS_INTERVAL_S:
                state["t"], state["stage"] = now, stage
                self.send({"type": "progress", "id": rid, "stage": stage, "fraction": round(float(fraction), 4)})

        return progress

    # --- methods --------------------------------------------------------------------------------
    def _out(self, params: dict[str, Any]) -> Path:
        if self.out is None and "out" not in params:
            self.out = Path(tempfile.mkdtemp(prefix="decipher-mr-worker-"))
        out = Path(_param(params, "out", str, str(self.out)))
        out.mkdir(parents=True, exist_ok=True)
        return out

    # --- transport: volumes and maps in-band (protocol 2) -----------------------------------------
    def _put_volume(self, params: dict[str, Any]) -> dict[str, Any]:
        from .transport import decode_volume, valid_key

        key = _param(params, "key")
        if not valid_key(key):
            raise BadRequest("parameter 'key' must be 8-64 lowercase hex digits")
        blob = _param(params, "volume", dict)
        try:
            volume = decode_volume(blob, name=str(params.get("name") or f"upload-{key[:8]}"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        from decipher_mr.data.volume import freeze

        freeze(volume.array)  # nobody changes it in place: the session hashes it once, not on every query
        self._uploads.pop(key, None)
        self._uploads[key] = volume
        while len(self._uploads) > UPLOADS_KEPT:
            self._uploads.pop(next(iter(self._uploads)))
        return {"volume": f"upload:{key}", "shape": list(volume.array.shape), "kept": len(self._uploads)}

    def _volume(self, params: dict[str, Any]):
        """The request's volume: a path on this machine, or ``upload:<key>`` of a volume sent in-band."""
        volume = _param(params, "volume")
        if volume.startswith("upload:"):
            found = self._uploads.get(volume[len("upload:"):])
            if found is None:
                raise UnknownVolume(f"{volume}: no such volume here (sent to another worker, or dropped: send it again)")
            self._uploads[volume[len("upload:"):]] = self._uploads.pop(volume[len("upload:"):])  # most recent last
            return found
        return volume

    def _emit(self, params: dict[str, Any], volume, name: str, compress: bool) -> Any:
        """A result map: written to a file (its path) or, with ``inline``, the map itself in-band."""
        inline = params.get("inline", False)
        if inline not in (False, True, "exact", "float16"):
            raise BadRequest("parameter 'inline' must be true, false, 'exact' or 'float16'")
        if inline:
            from .transport import encode_volume

            return encode_volume(volume, precision="float16" if inline == "float16" else "exact")
        from decipher_mr.data.volume import write_volume

        return str(write_volume(volume, self._out(params) / name, compress))

    def handle(self, method: str, params: dict[str, Any], progress: Callable[[str, float], None]) -> dict[str, Any]:
        """Run one request; returns the JSON-ready result."""
        from .outputs import FORMATS, safe_name
        from .results import MAP_GRIDS, result_maps

        if not isinstance(params, dict):
            raise BadRequest("'params' must be an object")
        s = self.session
        if method == "ping":
            return {"pong": True}
        if method == "info":
            return {**s.describe(), **engine_facts(s), "stats": dict(s.stats)}
        if method == "put_volume":
            return self._put_volume(params)
        if method == "search_text":
            hits = s.search_text(_param(params, "text"), _param(params, "index"), k=_param(params, "k", int, 10),
                                 space=_param(params, "space", str, "image"), exact=_param(params, "exact", bool, False))
            return {"hits": [h.summary(include_report=True) for h in hits]}
        methods = ("encode", "segment", "anomaly", "ground", "localize", "classify", "retrieve_reports", "retrieve_cases")
        if method not in methods:
            raise BadRequest(f"unknown method {method!r}; methods: ping, info, put_volume, {', '.join(methods)}, "
                             "search_text, cancel, shutdown")
        volume = self._volume(params)
        head = _param(params, "head", str, None)
        fmt = _param(params, "format", str, "nii.gz")
        if fmt not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}")
        suffix = FORMATS[fmt]
        compress = _param(params, "compress", bool, True)  # False for private exchange files: no gzip cost
        grid = _param(params, "map_grid", str, "input")  # "model": maps on the model's grid, not resampled
        if grid not in MAP_GRIDS:
            raise BadRequest(f"map_grid must be one of {', '.join(MAP_GRIDS)}")
        hits_before = s.stats["encode_cache_hits"]
        enc = s.encode(volume, progress)
        cached = s.stats["encode_cache_hits"] > hits_before
        base = {"cached": cached, "grid": list(enc.grid), "windows": enc.windows}
        stem = f"{method}-{safe_name(str(params.get('name') or time.strftime('%H%M%S')))}"
        if method == "encode":
            return {**base, "shape": list(enc.source.shape), "encode_seconds": round(enc.encode_seconds, 4)}
        if method == "segment":
            r = s.segment(volume, head, progress)
            maps = result_maps(r, grid)
            return {**base, **r.summary(grid), "file": self._emit(params, maps["labels"], f"{stem}{suffix}", compress)}
        if method in ("anomaly", "ground"):
            r = (s.anomaly_map(volume, head, progress) if method == "anomaly"
                 else s.ground(volume, _param(params, "text"), head, progress))
            maps = result_maps(r, grid)
            return {**base, **r.summary(grid), "file": self._emit(params, maps["heatmap"], f"{stem}{suffix}", compress),
                    "mask_file": self._emit(params, maps["mask"], f"{stem}-mask{suffix}", compress)}
        if method == "localize":
            return {**base, **s.localize(volume, head, progress, keep_heatmaps=False).summary()}
        if method == "classify":
            return {**base, "heads": s.classify(volume, progress)}
        k = _param(params, "k", int, 5)
        exact = _param(params, "exact", bool, False)
        if method == "retrieve_reports":
            reports = _param(params, "reports", list, None)
            hits = s.retrieve_reports(volume, reports=reports, index=params.get("index"), k=k, exact=exact)
        else:
            hits = s.retrieve_cases(volume, _param(params, "index"), k=k, exact=exact)
        return {**base, "hits": [h.summary(include_report=True) for h in hits]}


def protocol_stdout() -> io.TextIOBase:
    """A private text stream on the real stdout; fd 1 (and ``sys.stdout``) then point at stderr."""
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return io.TextIOWrapper(os.fdopen(private, "wb", buffering=0), encoding="utf-8", line_buffering=True,
                            write_through=True)


def run_worker(bundle: str, device: str = "auto", out: str | None = None, max_tokens: int | None = None) -> int:
    """Load the bundle and serve stdin until it closes or a ``shutdown`` request arrives.

    >>> run_worker("model.zip")      # what `decipher-mr worker --bundle model.zip` runs
    """
    stream = protocol_stdout()
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    try:
        from .session import Session

        kwargs = {"max_tokens": max_tokens} if max_tokens else {}
        session = Session.from_bundle(bundle, device=device, **kwargs)
    except Exception as exc:
        stream.write(json.dumps({"type": "fatal", "error": {"code": type(exc).__name__, "message": str(exc)}}) + "\n")
        stream.flush()
        return 2
    return Worker(session, stdin, stream, Path(out) if out else None).serve()
