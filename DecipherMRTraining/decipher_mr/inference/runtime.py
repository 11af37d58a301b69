"""What a :class:`~decipher_mr.inference.session.Session` runs on: the device, the thread count of small
CPU work, the fingerprint of a bundle's embeddings, and the volumes it is handed (a path or a Volume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from decipher_mr.data.volume import Volume

from .errors import InferenceError


@contextlib.contextmanager
def single_thread(device: torch.device):
    """Run small CPU work (a short query through the text tower, a token-level head) on one thread.

    Such work is a few small matrix products; splitting them across threads only adds OpenMP
    barriers, which cost milliseconds each when another process holds the other core.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU.

    >>> resolve_device("auto")
    device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bundle_fingerprint(bundle) -> str:
    """A hash of what decides embeddings: encoder, text tower and projection weights and preprocessing.

    Heads, the model card and the export time do not enter, so re-exporting the same model with
    another head keeps the fingerprint (and an index built with it stays valid).

    >>> bundle_fingerprint(load_bundle("model.zip"))[:12]
    """
    cfg, files = bundle.config, bundle.manifest["files"]
    wanted = [cfg["vision"]["weights"]]
    if cfg.get("alignment"):
        wanted.append(cfg["alignment"]["weights"])
        folder = cfg["text"]["folder"] + "/"
        wanted += sorted(rel for rel in files if rel.startswith(folder))
    h = hashlib.sha256()
    for rel in wanted:
        h.update(f"{rel}:{files[rel]['sha256']}\n".encode())
    h.update(json.dumps(cfg["preprocess"], sort_keys=True).encode())
    return h.hexdigest()


def as_volume(volume: Volume | str | os.PathLike) -> Volume:
    """A :class:`Volume` from a Volume or a path; refuses 2D images with a clear message."""
    from decipher_mr.data.io import read_volume

    if isinstance(volume, (str, os.PathLike)):
        volume = read_volume(volume)
    if not isinstance(volume, Volume):
        raise InferenceError(f"expected a Volume (array plus geometry) or a path to one, got {type(volume).__name__}")
    flat = [a for a, n in enumerate(volume.shape) if n < 2]
    if flat:
        raise InferenceError(f"{volume.describe()}: is a 2D image (shape {volume.shape}, a single slice along axis "
                             f"{flat[0]}); DecipherMR needs a 3D volume")
    return volume


def file_key(volume) -> tuple | None:
    """``(path, mtime_ns, size, inode)`` of a volume file (a DICOM folder or a Volume: None)."""
    if not isinstance(volume, (str, os.PathLike)):
        return None
    try:
        path = Path(volume).resolve()
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino) if path.is_file() else None
