"""Reading bundle zips safely: every entry is checked before anything is written.

A zip is never extracted next to itself or into the current directory. It goes to a per-user cache
folder keyed by the zip's sha256 (``bundles/<hash>`` under :func:`user_cache_base`: ``$DECIPHER_MR_CACHE``,
else the platform's per-user cache folder), under a temporary name that is renamed into place
once every file is out, so a reader sees a whole extraction or none. The same zip is extracted once;
its files are still checked against the manifest on every load (see :mod:`decipher_mr.bundle.reader`).

Refused, naming the zip and the entry: absolute paths, drive letters, backslashes, ``..``
components, symlinks and other special files, duplicate names, encrypted entries, and entries that
decompress to more bytes than they declare (zip bombs), and zips that would not fit on the disk.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Mapping

from decipher_mr.bundle.format import BundleError
from decipher_mr.storage import sha256_file

COPY_CHUNK = 1 << 20


def user_cache_base(platform: str = sys.platform, env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """The per-user cache folder of DecipherMR on this platform: ``$DECIPHER_MR_CACHE`` when set, else
    ``%LOCALAPPDATA%\\decipher-mr\\Cache`` on Windows, ``~/Library/Caches/decipher-mr`` on macOS and
    ``$XDG_CACHE_HOME/decipher-mr`` (default ``~/.cache/decipher-mr``) elsewhere.

    The Slicer module's ``DecipherMRLib.ModelsFolder`` applies the same rule without importing this
    package (a test keeps the two equal on every platform).

    >>> user_cache_base("darwin", env={}, home=Path("/Users/me"))
    PosixPath('/Users/me/Library/Caches/decipher-mr')
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else Path(home)
    if env.get("DECIPHER_MR_CACHE"):
        return Path(env["DECIPHER_MR_CACHE"]).expanduser()
    if platform.startswith("win"):
        return Path(env.get("LOCALAPPDATA") or str(home / "AppData" / "Local")) / "decipher-mr" / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / "decipher-mr"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "decipher-mr"


def bundle_cache_root() -> Path:
    """Where extracted bundles live for this user.

    >>> bundle_cache_root()
    PosixPath('/home/me/.cache/decipher-mr/bundles')
    """
    return user_cache_base() / "bundles"


def safe_member_path(info: zipfile.ZipInfo, zip_path: Path) -> PurePosixPath | None:
    """The relative path an entry would be written to, or ``None`` for a directory entry.

    Raises :class:`BundleError` for any entry that could land outside the extraction folder or
    that is not a plain file.

    >>> safe_member_path(zipfile.ZipInfo("heads/seg/labels.csv"), Path("model.zip"))
    PurePosixPath('heads/seg/labels.csv')
    """
    name = info.filename
    where = f"{zip_path}: entry {name!r}"
    if "\\" in name or "\x00" in name:
        raise BundleError(f"{where} has a backslash or NUL in its name; refusing the archive")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{where} is an absolute path that escapes the bundle folder; refusing the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{where} contains '..' and escapes the bundle folder (zip-slip); refusing the archive")
    if info.flag_bits & 0x1:
        raise BundleError(f"{where} is encrypted; refusing the archive")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise BundleError(f"{where} is a symbolic link; refusing the archive")
    if info.is_dir():
        if kind not in (0, stat.S_IFDIR):
            raise BundleError(f"{where} is not a plain folder; refusing the archive")
        return None
    if kind not in (0, stat.S_IFREG):
        raise BundleError(f"{where} is not a plain file (mode {oct(mode)}); refusing the archive")
    if not parts:
        raise BundleError(f"{where} has an empty name; refusing the archive")
    return PurePosixPath(*parts)


def check_zip(zf: zipfile.ZipFile, zip_path: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Check every entry of an open zip; return the files to extract with their safe paths."""
    out: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    seen: dict[str, str] = {}
    for info in zf.infolist():
        rel = safe_member_path(info, zip_path)
        if rel is None:
            continue
        key = str(rel).casefold()  # two names that collide on a case-insensitive disk are a trap too
        if key in seen:
            raise BundleError(f"{zip_path}: entries {seen[key]!r} and {info.filename!r} name the same file; "
                              "refusing the archive")
        seen[key] = info.filename
        out.append((info, rel))
    dirs = {str(p) for _, rel in out for p in rel.parents if str(p) != "."}
    clash = sorted(dirs & {str(rel) for _, rel in out})
    if clash:
        raise BundleError(f"{zip_path}: {clash[0]!r} is both a file and a folder; refusing the archive")
    return out


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, zip_path: Path) -> None:
    written = 0
    with zf.open(info) as src, open(dest, "xb") as out:
        while block := src.read(COPY_CHUNK):
            written += len(block)
            if written > info.file_size:
                raise BundleError(f"{zip_path}: entry {info.filename!r} decompresses to more than the "
                                  f"{info.file_size} bytes it declares; refusing the archive")
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def extract_bundle_zip(zip_path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Extract a bundle zip into the per-user cache (once per distinct zip) and return the folder.

    >>> folder = extract_bundle_zip("model.zip")      # ~/.cache/decipher-mr/bundles/<sha256>/
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise BundleError(f"{zip_path}: bundle zip not found")
    root = Path(cache_root) if cache_root is not None else bundle_cache_root()
    digest = sha256_file(zip_path)
    dest = root / digest
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = check_zip(zf, zip_path)
            if dest.is_dir():
                return dest
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            declared = sum(info.file_size for info, _ in members)
            free = shutil.disk_usage(root).free
            if declared > free:
                raise BundleError(f"{zip_path}: unpacks to {declared} bytes but {root} has only {free} free")
            tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=root))
            try:
                for info, rel in members:
                    target = tmp.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _copy_member(zf, info, target, zip_path)
                try:
                    os.rename(tmp, dest)
                except OSError:
                    # another process finished the same extraction first; theirs is as good as ours
                    if not dest.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{zip_path}: not a readable zip archive ({exc})") from exc
    except zipfile.LargeZipFile as exc:
        raise BundleError(f"{zip_path}: {exc}") from exc
    return dest
