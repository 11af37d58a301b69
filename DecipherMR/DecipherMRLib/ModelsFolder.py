"""The per-user models folder: where zipped bundles are unpacked (never inside the extension).

The rule is the one ``decipher_mr.bundle.archive.bundle_cache_root`` uses (a test keeps the two equal);
it is repeated here so that showing or clearing the folder does not import the engine (and torch).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def models_folder() -> Path:
    """The folder unpacked bundles live in (``$DECIPHER_MR_CACHE``/``$XDG_CACHE_HOME``/``~/.cache``).

    >>> models_folder()
    PosixPath('/home/me/.cache/decipher-mr/bundles')
    """
    base = os.environ.get("DECIPHER_MR_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "decipher-mr") if xdg else str(Path.home() / ".cache" / "decipher-mr")
    return Path(base) / "bundles"


def models_folder_size(folder: Path | None = None) -> int:
    """Bytes used by unpacked bundles.

    >>> models_folder_size() // 2**20   # MiB
    """
    folder = folder or models_folder()
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def clear_models_folder(folder: Path | None = None) -> int:
    """Delete every unpacked bundle (they are unpacked again from their zip when next used); returns
    how many were removed. Only the folder's own entries go: nothing outside it is followed.

    >>> clear_models_folder()
    """
    folder = folder or models_folder()
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        removed += 1
    return removed
