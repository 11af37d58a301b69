"""How a client reaches ``decipher-mr worker``: a local process, or the same worker on another machine
through the system ``ssh`` client. Also the in-band encoding of volumes and result maps (protocol 2),
for machines that share no disk. Pure Python and numpy: safe inside 3D Slicer's GUI process.

Authentication and encryption are SSH's: this module only builds an ``ssh`` command line (OpenSSH, as
installed on Linux, macOS and Windows 10+), in batch mode, so a missing or refused key fails at once
instead of waiting at a password prompt nobody can see. Nothing is stored, no port is opened.

>>> target = EngineTarget.parse("alice@gpu-server", port=2222, identity="~/.ssh/id_ed25519")
>>> target.command("/data/models/bundle.zip", device="cuda")[:3]
['ssh', '-T', '-o']
"""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

LOCAL = "local"
DEFAULT_REMOTE_COMMAND = "decipher-mr"
# Keepalives notice a dead link within about a minute; connecting gives up after CONNECT_TIMEOUT_S.
SERVER_ALIVE_INTERVAL_S = 15
SERVER_ALIVE_COUNT_MAX = 4
CONNECT_TIMEOUT_S = 20
ZLIB_LEVEL = 1  # fast: maps are sent on every query; higher levels save little on MRI noise
BLOB_ENCODING = "zlib+base64"
_HOST = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?(?P<host>\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+)(?::(?P<port>\d{1,5}))?$")
_KEY = re.compile(r"^[0-9a-f]{8,64}$")


class EngineUnreachable(RuntimeError):
    """The engine's host could not be reached or refused the connection (a clear message for the user)."""


@dataclass(frozen=True)
class EngineTarget:
    """Where the worker runs: ``host`` None means this machine (a local child process).

    ``remote_command`` is what the server's shell runs (``decipher-mr``, a full path such as
    ``/opt/dmr/bin/decipher-mr``, or ``conda run -n dmr decipher-mr``); ``ssh_options`` are extra
    ``-o Key=Value`` settings; ``ssh_config`` an ``ssh -F`` file. Everything else (host keys, jump
    hosts, agents) comes from the user's own ssh configuration.
    """

    host: str | None = None
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    remote_command: str = DEFAULT_REMOTE_COMMAND
    ssh_options: tuple[str, ...] = field(default_factory=tuple)
    ssh_config: str | None = None
    ssh: str | None = None  # the ssh program (default: found on PATH)

    @classmethod
    def parse(cls, engine: str | None, port: int | None = None, identity: str | None = None,
              remote_command: str | None = None, ssh_options: Sequence[str] = (), ssh_config: str | None = None,
              ssh: str | None = None) -> "EngineTarget":
        """``"local"`` (or empty) or ``user@host`` / ``host`` / ``user@host:port``.

        >>> EngineTarget.parse("bob@10.0.0.5:2200").port
        2200
        """
        text = str(engine or "").strip()
        if not text or text.lower() == LOCAL:
            return cls()
        match = _HOST.match(text)
        if text.startswith("-") or match is None or match.group("host").startswith("-"):
            raise ValueError(f"engine {text!r}: expected 'local' or user@host (optionally user@host:port)")
        if match.group("port"):
            port = port or int(match.group("port"))
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"engine port {port}: expected 1-65535")
        for option in ssh_options:
            if not re.match(r"^[A-Za-z]+=\S", str(option)):
                raise ValueError(f"ssh option {option!r}: expected Key=Value (as in ssh -o)")
        return cls(host=match.group("host").strip("[]"), user=match.group("user"), port=int(port) if port else None,
                   identity=str(identity) if identity else None,
                   remote_command=(remote_command or "").strip() or DEFAULT_REMOTE_COMMAND,
                   ssh_options=tuple(str(o) for o in ssh_options), ssh_config=ssh_config or None, ssh=ssh)

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else str(self.host)

    def label(self) -> str:
        """``user@host:port`` or ``local``, for messages."""
        if not self.remote:
            return LOCAL
        return self.destination + (f":{self.port}" if self.port else "")

    def ssh_program(self) -> str:
        program = self.ssh or shutil.which("ssh")
        if not program:
            raise EngineUnreachable("no ssh client found on this machine: install OpenSSH (on Windows 10+: the "
                                    "'OpenSSH Client' optional feature) to use a remote engine")
        return program

    def ssh_args(self) -> list[str]:
        """The ssh options (before the destination); no password prompt, no tty, keepalives."""
        args = ["-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_S}", "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}",
                "-o", "Compression=no", "-e", "none"]  # volumes travel compressed already; no escape character
        if self.ssh_config:
            args[:0] = ["-F", str(self.ssh_config)]
        if self.port:
            args += ["-p", str(self.port)]
        if self.identity:
            from pathlib import Path

            args += ["-i", str(Path(self.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
        for option in self.ssh_options:
            args += ["-o", option]
        return args

    def remote_argv(self, args: Sequence[str]) -> str:
        """The command line the server's shell runs, each argument quoted for a POSIX shell."""
        return " ".join([self.remote_command, *(shlex.quote(str(a)) for a in args)])

    def command(self, bundle: str, device: str = "auto", extra_args: Sequence[str] = ()) -> list[str]:
        """The local command that starts ``decipher-mr worker`` on the host over ssh."""
        worker = ["worker", "--bundle", str(bundle), "--device", device or "auto", *extra_args]
        return [self.ssh_program(), *self.ssh_args(), "--", self.destination, self.remote_argv(worker)]

    def explain(self, code: int | None, stderr: Sequence[str], ready: bool, when: str) -> str | None:
        """A message for the user from ssh's exit code and its last stderr lines, or None (no idea).

        >>> target.explain(255, ["ssh: connect to host gpu port 22: Connection refused"], False, "at start")
        'cannot reach the DecipherMR engine on gpu: ...'
        """
        if not self.remote:
            return None
        text = " | ".join(line for line in stderr if line.strip())
        last = f" (ssh said: {text[-400:]})" if text else ""
        where = self.label()
        if re.search(r"Permission denied \(|Too many authentication failures|no mutual signature", text):
            key = f"the key {self.identity}" if self.identity else "your ssh keys"
            return (f"{where} refused {key}: add the public key to ~{self.user or ''}/.ssh/authorized_keys on "
                    f"{self.host} (ssh-copy-id), or choose the right identity file{last}")
        if re.search(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No .* host key is known", text):
            return (f"{where}: its host key is unknown or has changed; connect once with `ssh {self.destination}` in a "
                    f"terminal to check and accept it{last}")
        if code == 255 and not ready and re.search(
                r"Connection refused|Connection timed out|timed out|No route to host|Could not resolve|"
                r"Name or service not known|Network is unreachable|Connection reset|Connection closed", text):
            return f"cannot reach the DecipherMR engine on {where}: check the host name, port and network{last}"
        if code == 127 or re.search(r"command not found|No such file or directory|not recognized as", text):
            return (f"`{self.remote_command}` was not found on {self.host}: install the engine there "
                    f"(pip install decipher-mr, from the wheel) or set the remote command to its full path{last}")
        if ready and (code == 255 or code is None or code < 0):
            return (f"the connection to the DecipherMR engine on {where} dropped {when}; the next run reconnects{last}")
        if code == 255:
            return f"ssh to {where} failed {when}{last}"
        return None


# --- in-band arrays and volumes (protocol 2) ----------------------------------------------------


# A byte plane is sent as stored when a sample of it compresses worse than this: the low mantissa bytes of a
# float map are noise, and zlib spends most of its time on them for a few per cent (measured on a Colin27
# heatmap: 52 ms for the whole float32 map at level 1, 7 ms for the planes that compress, 10% larger).
RAW_RATIO = 0.9
_SAMPLE_CHUNKS, _SAMPLE_BYTES = 8, 8192


def _worth_compressing(plane: memoryview, level: int) -> bool:
    """Whether zlib shrinks this byte plane noticeably, judged on a few chunks spread over it."""
    n = len(plane)
    if n <= _SAMPLE_CHUNKS * _SAMPLE_BYTES:
        sample = bytes(plane)
    else:
        step = n // _SAMPLE_CHUNKS
        sample = b"".join(bytes(plane[i * step:i * step + _SAMPLE_BYTES]) for i in range(_SAMPLE_CHUNKS))
    return len(zlib.compress(sample, level)) < RAW_RATIO * len(sample)


def encode_array(array: np.ndarray, level: int = ZLIB_LEVEL) -> dict[str, Any]:
    """A JSON-ready blob: ``{"encoding": "zlib+base64", "dtype": "<f4", "shape": [...], "shuffle": true,
    "planes": [["raw", n], ["zlib", m], ...], "data": "..."}`` (C order, little-endian dtype string as numpy
    writes it). ``shuffle``: the bytes were grouped by significance (byte 0 of every value, then byte 1, ...);
    ``planes``: each byte plane's segment of ``data`` in order, zlib-compressed or stored as is (planes of
    noise, which zlib would spend its time on for nothing). Lossless. A single-byte array is one zlib stream.

    >>> decode_array(encode_array(np.arange(6, dtype=np.int16).reshape(2, 3))).shape
    (2, 3)
    """
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    blob: dict[str, Any] = {"encoding": BLOB_ENCODING, "dtype": array.dtype.str, "shape": list(array.shape)}
    if array.dtype.itemsize == 1:
        blob.update(shuffle=False, data=base64.b64encode(zlib.compress(array.tobytes(), level)).decode("ascii"))
        return blob
    planes = np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.dtype.itemsize).T)
    parts, layout = [], []
    for plane in planes:
        raw = memoryview(plane)
        packed = zlib.compress(raw, level) if _worth_compressing(raw, level) else None
        if packed is not None and len(packed) < len(raw):
            parts.append(packed)
            layout.append(["zlib", len(packed)])
        else:
            parts.append(raw.tobytes())
            layout.append(["raw", len(raw)])
    blob.update(shuffle=True, planes=layout, data=base64.b64encode(b"".join(parts)).decode("ascii"))
    return blob


def _unpack(blob: dict[str, Any], dtype: np.dtype, count: int) -> np.ndarray:
    """The array's values (flat, ``dtype``) from ``data``: one zlib stream (shuffled or not), or byte planes
    written straight into place."""
    data = base64.b64decode(blob["data"], validate=True)
    layout = blob.get("planes")
    if layout is None:
        raw = zlib.decompress(data)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"{len(raw)} bytes for {count} values of {dtype}")
        if blob.get("shuffle") and dtype.itemsize > 1:
            return np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, -1).T.copy().view(dtype).reshape(-1)
        return np.frombuffer(raw, dtype=dtype)
    if not isinstance(layout, list) or len(layout) != dtype.itemsize or not blob.get("shuffle"):
        raise ValueError("'planes' must list one [kind, bytes] per byte of the dtype, with 'shuffle'")
    out = np.empty((count, dtype.itemsize), np.uint8)
    at = 0
    for byte, (kind, size) in enumerate(layout):
        size = int(size)
        if kind not in ("raw", "zlib") or size < 0 or at + size > len(data):
            raise ValueError(f"bad plane {kind!r} of {size} bytes")
        plane = zlib.decompress(data[at:at + size]) if kind == "zlib" else data[at:at + size]
        if len(plane) != count:
            raise ValueError(f"a byte plane holds {len(plane)} bytes, not {count}")
        out[:, byte] = np.frombuffer(plane, np.uint8)
        at += size
    if at != len(data):
        raise ValueError("data is longer than its planes")
    return out.view(dtype).reshape(-1)


def decode_array(blob: dict[str, Any]) -> np.ndarray:
    """The array an :func:`encode_array` blob holds; ``ValueError`` for anything malformed."""
    if not isinstance(blob, dict) or blob.get("encoding") != BLOB_ENCODING:
        raise ValueError(f"an in-band array must have encoding {BLOB_ENCODING!r}")
    try:
        dtype = np.dtype(str(blob["dtype"]))
        shape = tuple(int(n) for n in blob["shape"])
        if dtype.hasobject or dtype.itemsize == 0 or len(shape) > 4 or any(n < 0 for n in shape):
            raise ValueError(f"unsupported dtype {dtype} or shape {shape}")
        values = _unpack(blob, dtype, int(np.prod(shape)))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"an in-band array could not be decoded: {exc}") from exc
    return values.reshape(shape)


def encode_volume(volume, level: int = ZLIB_LEVEL, precision: str = "exact") -> dict[str, Any]:
    """A volume (array + LPS geometry) as a JSON-ready blob; ``precision="float16"`` sends a floating-point
    map as float16 (about 3x smaller and faster; error at most 2.4e-4 on a map in [0, 1]).

    >>> decode_volume(encode_volume(vol)).spacing == vol.spacing
    True
    """
    array = np.asarray(volume.array)
    if precision == "float16" and array.dtype.kind == "f":
        array = array.astype(np.float16)
    return {**encode_array(array, level), "spacing": [float(s) for s in volume.spacing],
            "origin": [float(o) for o in volume.origin],
            "direction": np.asarray(volume.direction, dtype=np.float64).tolist()}


def decode_volume(blob: dict[str, Any], name: str | None = None):
    """The ``Volume`` an :func:`encode_volume` blob holds (its array is writable)."""
    from decipher_mr.data.volume import Volume

    array = decode_array(blob)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif not array.flags.writeable:  # byte planes come back in a fresh array already
        array = array.copy()
    if array.ndim != 3:
        raise ValueError(f"an in-band volume must be 3D, got shape {array.shape}")
    try:
        spacing = tuple(float(s) for s in blob["spacing"])
        origin = tuple(float(o) for o in blob["origin"])
        direction = np.asarray(blob["direction"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"an in-band volume's geometry could not be read: {exc}") from exc
    if len(spacing) != 3 or len(origin) != 3 or direction.shape != (3, 3):
        raise ValueError("an in-band volume needs 3 spacings, 3 origin values and a 3x3 direction")
    return Volume(array, spacing, origin, direction, path=name)


def volume_key(volume) -> str:
    """A content key for a volume (voxels and geometry): the same volume is sent to a server once.

    >>> len(volume_key(vol))
    32
    """
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(memoryview(np.ascontiguousarray(volume.array)).cast("B"))  # no copy of the voxels
    digest.update(repr((volume.array.dtype.str, tuple(volume.array.shape), tuple(volume.spacing), tuple(volume.origin),
                        np.asarray(volume.direction).round(9).tolist())).encode())
    return digest.hexdigest()


def valid_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_KEY.match(key))
