"""What the module needs beyond Slicer, checked without importing it, and installed on request only.

``check_dependencies`` reads the shipped ``decipher-mr`` package's own ``pyproject.toml``, so the list the
user confirms is exactly what its install would pull in. torch goes through the PyTorch extension when it
is present (it picks the CUDA build that fits the machine); everything else through pip, the package
itself from the copy shipped with the extension (never from an index).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

MODULE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "decipher-mr"
# Where the package sits: beside the module in a source checkout, inside the module in a built extension.
SHIPPED_PACKAGE_CANDIDATES = (MODULE_DIR.parent / "DecipherMRTraining", MODULE_DIR / "DecipherMRTraining")


@dataclass(frozen=True)
class Requirement:
    """One dependency: what it is, whether it is there, and how it would be installed.

    >>> Requirement("torch", ">=2.4", installed_version=None, via="PyTorch extension").missing
    True
    """

    name: str
    specifier: str
    installed_version: str | None
    via: str  # "PyTorch extension", "pip", or "shipped copy"
    source: str = ""  # a local path for the shipped copy

    @property
    def missing(self) -> bool:
        if self.installed_version is None:
            return True
        return not version_satisfies(self.installed_version, self.specifier)

    def describe(self) -> str:
        """One line for the install dialog.

        >>> req.describe()
        'torch >=2.4 (not installed) via the PyTorch extension'
        """
        have = f"installed {self.installed_version}, too old" if self.installed_version else "not installed"
        where = {"PyTorch extension": "the PyTorch extension", "pip": "pip", "shipped copy": f"the copy shipped with the extension ({self.source})"}[self.via]
        return f"{self.name} {self.specifier} ({have}) via {where}".replace("  ", " ")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def version_satisfies(version: str, specifier: str) -> bool:
    """True when ``version`` meets a simple ``>=``/``==`` specifier (all pyproject.toml uses).

    >>> version_satisfies("2.13.0+cpu", ">=2.4")
    True
    """
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = re.match(r"(>=|==|<=|<|>|~=)\s*(.+)", clause)
        if not match:
            continue
        op, want = match.group(1), _version_tuple(match.group(2))
        have = _version_tuple(version)[: len(want)] if op == "==" else _version_tuple(version)
        ok = {">=": have >= want, "==": have == want, "<=": have <= want, "<": have < want, ">": have > want, "~=": have >= want}[op]
        if not ok:
            return False
    return True


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, read from its metadata (nothing is imported).

    >>> installed_version("numpy")
    '2.4.6'
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def shipped_package_dir(candidates: Iterable[Path] = SHIPPED_PACKAGE_CANDIDATES) -> Path | None:
    """The folder of the ``decipher-mr`` package shipped with the extension, or None.

    >>> shipped_package_dir()
    PosixPath('.../DecipherMRTraining')
    """
    for folder in candidates:
        if (Path(folder) / "pyproject.toml").is_file():
            return Path(folder)
    return None


def package_requirements(package_dir: Path) -> list[tuple[str, str]]:
    """``(name, specifier)`` pairs of the shipped package's runtime dependencies.

    >>> package_requirements(shipped_package_dir())[0]
    ('torch', '>=2.4')
    """
    import tomllib

    data = tomllib.loads((Path(package_dir) / "pyproject.toml").read_text(encoding="utf-8"))
    out = []
    for line in data.get("project", {}).get("dependencies", []):
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", line)
        if match:
            out.append((match.group(1), match.group(2).split(";")[0].strip()))
    return out


def check_dependencies(package_dir: Path | None = None, pytorch_extension: bool = False) -> list[Requirement]:
    """Every dependency of the module with its state; nothing is imported or installed.

    >>> [r.describe() for r in check_dependencies() if r.missing]
    """
    package_dir = package_dir or shipped_package_dir()
    if package_dir is None:
        raise FileNotFoundError(
            "the decipher-mr package is not shipped beside the module "
            f"(looked in {', '.join(str(c) for c in SHIPPED_PACKAGE_CANDIDATES)})"
        )
    reqs = [
        Requirement(name, spec, installed_version(name), "PyTorch extension" if name == "torch" and pytorch_extension else "pip")
        for name, spec in package_requirements(package_dir)
    ]
    import tomllib

    own_version = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    reqs.append(Requirement(PACKAGE_NAME, f"=={own_version}", installed_version(PACKAGE_NAME), "shipped copy", str(package_dir)))
    return reqs


def install_plan(requirements: Sequence[Requirement]) -> str:
    """The text of the one confirmation dialog: every missing item and how it would be installed.

    >>> print(install_plan(check_dependencies()))
    """
    missing = [r for r in requirements if r.missing]
    if not missing:
        return "Everything DecipherMR needs is installed."
    lines = ["DecipherMR needs the following, which will be installed now:", ""]
    lines += [f"  • {r.describe()}" for r in missing]
    lines += ["", "Nothing else is downloaded or changed. Continue?"]
    return "\n".join(lines)


def install_missing(
    requirements: Sequence[Requirement],
    pip_install: Callable[[str], None],
    install_torch: Callable[[], None] | None = None,
) -> list[str]:
    """Install what is missing, torch first; returns the names installed.

    ``pip_install`` is ``slicer.util.pip_install`` in Slicer; ``install_torch`` calls the PyTorch
    extension's logic. Called only after the user confirmed ``install_plan``.

    >>> install_missing(check_dependencies(pytorch_extension=True), slicer.util.pip_install, torch_logic.installTorch)
    """
    done = []
    ordered = sorted((r for r in requirements if r.missing), key=lambda r: (r.via != "PyTorch extension", r.via == "shipped copy"))
    for req in ordered:
        if req.via == "PyTorch extension":
            if install_torch is None:
                raise RuntimeError("torch is to come from the PyTorch extension, but no installer for it was given")
            install_torch()
        elif req.via == "shipped copy":
            # No index involved: the package comes from the extension's own copy; its dependencies are
            # listed above and already satisfied when this runs last.
            pip_install(f'"{req.source}"')
        else:
            pip_install(f'"{req.name}{req.specifier}"')
        done.append(req.name)
    return done


def worker_python() -> str:
    """The Python that runs the inference worker: Slicer's own (PythonSlicer) or this interpreter.

    >>> worker_python()
    """
    exe = Path(sys.executable)
    slicer_python = exe.with_name("PythonSlicer" + exe.suffix)
    return str(slicer_python if slicer_python.exists() else exe)
