"""The per-user models folder: where zipped bundles are unpacked (never inside the extension, never in
``~/.cache`` on Windows or macOS, where that is not the platform's cache).

The rule is the one ``decipher_mr.bundle.archive.bundle_cache_root`` uses (a test keeps the two equal);
it is repeated here so that showing or clearing the folder does not import the engine (and torch).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional


def user_cache_base(platform: str = sys.platform, env: Optional[Mapping[str, str]] = None, home: Optional[Path] = None) -> Path:
    """The per-user cache folder of DecipherMR on this platform: ``$DECIPHER_MR_CACHE`` when set, else
    ``%LOCALAPPDATA%\\decipher-mr\\Cache`` on Windows, ``~/Library/Caches/decipher-mr`` on macOS and
    ``$XDG_CACHE_HOME/decipher-mr`` (default ``~/.cache/decipher-mr``) elsewhere, the locations each
    platform's guidelines give (the ones ``platformdirs.user_cache_dir`` uses).

    >>> user_cache_base("darwin", env={}, home=Path("/Users/me"))
    PosixPath('/Users/me/Library/Caches/decipher-mr')
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else Path(home)
    if env.get("DECIPHER_MR_CACHE"):
        return Path(env["DECIPHER_MR_CACHE"]).expanduser()
    if platform.startswith("win"):
        local = env.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(local) / "decipher-mr" / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / "decipher-mr"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "decipher-mr"


def models_folder() -> Path:
    """The folder unpacked bundles live in: ``bundles`` under :func:`user_cache_base`.

    >>> models_folder()
    PosixPath('/home/me/.cache/decipher-mr/bundles')
    """
    return user_cache_base() / "bundles"


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
