"""The panel's inputs outside Qt: which devices it offers, what a chosen bundle path means, and how the
bundle, device and index are remembered between sessions.

The settings store is anything with ``value(key, default)`` and ``setValue(key, value)``: ``qt.QSettings``
in Slicer (PythonQt), ``PySide6.QtCore.QSettings`` in the tests. Values are read back all at once, before
the panel is connected, and written only when the user acts on them (a run, leaving the module, closing
Slicer), so restoring one value can never overwrite another and typing a path writes nothing.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Dict, Mapping

DEVICES = ("auto", "cpu", "cuda")

# Parameter name -> QSettings key (the keys are the ones earlier versions wrote, so nothing is lost).
SETTINGS_KEYS = {
    "bundlePath": "DecipherMR/BundlePath",
    "device": "DecipherMR/Device",
    "indexPath": "DecipherMR/IndexPath",
    "engine": "DecipherMR/Engine",
    "enginePort": "DecipherMR/EnginePort",
    "engineIdentity": "DecipherMR/EngineIdentity",
    "remoteCommand": "DecipherMR/RemoteCommand",
}

BUNDLE_CONFIG = "config.json"


def bundle_location(chosen: str, remote: bool = False) -> str:
    """The bundle a chosen path names: a ``.zip``, a folder, or a folder's ``config.json`` (the file a
    file dialog can pick) meaning its folder. With a ``remote`` engine the path is a path on the server:
    it is taken as typed (nothing is looked up on this machine), a ``config.json`` still meaning its folder.

    >>> bundle_location("/models/decipher-demo/config.json")
    '/models/decipher-demo'
    >>> bundle_location("/srv/models/not-on-this-laptop.zip", remote=True)
    '/srv/models/not-on-this-laptop.zip'
    """
    text = str(chosen or "").strip()
    if not text:
        return ""
    path = Path(text) if not remote else PurePosixPath(text)
    if path.name == BUNDLE_CONFIG and (remote or Path(text).is_file()):
        return str(path.parent)
    return text


def _as_text(value: Any) -> str:
    # QSettings gives None (PythonQt) or "" for a missing key, and may give a list for a value with commas
    # written by another program: anything that is not one string is treated as missing.
    return value if isinstance(value, str) else ""


def remembered_inputs(store) -> Dict[str, str]:
    """The remembered bundle, device and index; only values the panel can show are returned.

    >>> remembered_inputs(qt.QSettings())
    {'bundlePath': '/models/demo.zip', 'device': 'cuda', 'indexPath': '/models/index'}
    """
    values: Dict[str, Any] = {name: _as_text(store.value(key, "")) for name, key in SETTINGS_KEYS.items()}
    if values["device"] not in DEVICES:
        values["device"] = ""
    port = values.pop("enginePort")
    if port.isdigit() and 0 < int(port) < 65536:
        values["enginePort"] = int(port)
    return {name: value for name, value in values.items() if value}


def remember_inputs(store, inputs: Mapping[str, str]) -> list:
    """Write the inputs that differ from what is stored; returns the names written.

    >>> remember_inputs(qt.QSettings(), {"bundlePath": "/models/demo.zip", "device": "cpu", "indexPath": ""})
    ['bundlePath', 'device']
    """
    written = []
    for name, key in SETTINGS_KEYS.items():
        if name not in inputs:
            continue
        value = str(inputs[name] or "")
        if name == "enginePort" and value == "0":
            value = ""
        if _as_text(store.value(key, "")) != value:
            store.setValue(key, value)
            written.append(name)
    return written


def engine_summary(info: Mapping[str, Any], where: str = "local") -> str:
    """One line for the panel about what the engine loaded (the worker's ``ready`` fields).

    >>> engine_summary({"name": "demo", "fingerprint": "3092bf91...", "device": "cuda:0", "gpu": "NVIDIA H100",
    ...                 "host": "gpu-1", "protocol": 2}, "alice@gpu-1")
    'demo (3092bf910df0) on alice@gpu-1 (host gpu-1): cuda:0, NVIDIA H100'
    """
    if not info:
        return "Not connected."
    name = info.get("name") or Path(str(info.get("bundle") or "bundle")).name
    fingerprint = str(info.get("fingerprint") or "")[:12]
    host = f" (host {info['host']})" if where != "local" and info.get("host") else ""
    device = str(info.get("device") or "?") + (f", {info['gpu']}" if info.get("gpu") else "")
    return f"{name}{f' ({fingerprint})' if fingerprint else ''} on {where}{host}: {device}"
