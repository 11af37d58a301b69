"""What the module needs beyond Slicer, checked without importing it, and installed on request only.

The widget calls three things::

    plan = plan_install(pytorch_extension=torch_logic is not None)   # reads metadata, asks pip (dry run)
    plan.problem / plan.missing / plan.text()                         # what to show
    install(plan, slicer.util.pip_install, torch_logic.installTorch)  # after the user agreed

The list comes from the shipped ``decipher-mr`` package's own ``pyproject.toml`` (its runtime
``dependencies`` only, never the ``train``/``test``/``viewer`` extras). torch comes first, through the
PyTorch extension when it is there (it picks the CPU or CUDA build that fits the machine) or through pip;
every later pip call gets a constraints file pinning the installed torch, so no other package can replace
that build. The package itself is installed from a temporary copy of the one shipped with the extension,
with no index and no build isolation, so nothing is downloaded for it and nothing is written beside the
module.

This file must import on Python 3.9 (Slicer 5.6 and 5.8): there it explains that Slicer 5.10 is needed
instead of failing with a traceback. Hence no ``tomllib`` at import time and no ``X | Y`` annotations.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MODULE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_FOLDER = "DecipherMRTraining"
# Where the package sits: inside the module's folder in an installed extension and in a build tree
# (DecipherMR/CMakeLists.txt copies it to both), beside the module in a source checkout.
SHIPPED_PACKAGE_CANDIDATES = (MODULE_DIR / PACKAGE_FOLDER, MODULE_DIR.parent / PACKAGE_FOLDER)
TORCH = "torch"
# Builds the PyTorch extension installs; pinned in every later pip call so that nothing replaces them.
PINNED_FROM_EXTENSION = ("torch", "torchvision")
# Slicer 5.10 is the first release with Python >= 3.10 (it ships 3.12; 5.8 and 5.6 ship 3.9).
FIRST_SLICER_WITH_PYTHON_310 = "5.10"
# Copying the shipped package skips what an earlier build or run may have left in it.
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")


def _toml_loads(text: str) -> dict:
    """Parse TOML with the standard library (3.11+) or the tomli that pip vendors (Slicer 5.6/5.8).

    >>> _toml_loads('a = 1')
    {'a': 1}
    """
    try:
        import tomllib  # novermin (guarded: the fallback below serves 3.9 and 3.10)
    except ImportError:  # Python < 3.11: pip has vendored tomli since 21.2, and Slicer always has pip
        from pip._vendor import tomli as tomllib
    return tomllib.loads(text)


def _packaging():
    """``(Requirement, SpecifierSet)`` from ``packaging`` (Slicer 5.10 ships it) or pip's vendored copy.

    >>> Requirement, SpecifierSet = _packaging()
    """
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
    return Requirement, SpecifierSet


def version_satisfies(version: str, specifier: str) -> bool:
    """True when ``version`` meets a PEP 440 specifier (pre-releases and local builds count).

    >>> version_satisfies("2.13.0+cpu", ">=2.4")
    True
    """
    _, SpecifierSet = _packaging()
    return SpecifierSet(specifier).contains(version, prereleases=True)


@dataclass(frozen=True)
class PythonEnv:
    """The Python environment that is checked and installed into: this interpreter unless a test says otherwise.

    ``pip_command`` runs pip there (in Slicer ``sys.executable`` is PythonSlicer); ``index_options`` go to
    every pip call that may download (tests point them at local wheels); ``site_dirs`` are where its
    installed packages' metadata is read (None: this interpreter's ``sys.path``).

    >>> PythonEnv().installed_version("numpy")
    '2.4.6'
    """

    pip_command: Tuple[str, ...] = (sys.executable, "-m", "pip")
    index_options: Tuple[str, ...] = ()
    site_dirs: Optional[Tuple[str, ...]] = None

    def installed_version(self, distribution: str) -> Optional[str]:
        """The installed version of ``distribution``, read from its metadata (nothing is imported).

        >>> PythonEnv().installed_version("surely-not-installed")  # None
        """
        if self.site_dirs is None:
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                return None
        found = importlib.metadata.distributions(name=distribution, path=list(self.site_dirs))
        return next((dist.version for dist in found), None)


@dataclass(frozen=True)
class Requirement:
    """One runtime dependency: what is asked for, what is there, and how it would be installed.

    >>> Requirement("torch", ">=2.4", installed_version=None, via="PyTorch extension").missing
    True
    """

    name: str
    specifier: str
    installed_version: Optional[str]
    via: str  # "PyTorch extension", "pip", or "shipped copy"
    source: str = ""  # the folder of the shipped copy

    @property
    def missing(self) -> bool:
        """Not installed, or installed in a version the specifier excludes."""
        return self.installed_version is None or not version_satisfies(self.installed_version, self.specifier)

    @property
    def spec(self) -> str:
        """The requirement as pip takes it, e.g. ``'numpy>=1.26'``."""
        return f"{self.name}{self.specifier}"

    def describe(self) -> str:
        """One line for the install dialog.

        >>> Requirement("torch", ">=2.4", None, "PyTorch extension").describe()
        'torch>=2.4 (not installed) from the PyTorch extension, which picks the CPU or CUDA build for this computer'
        """
        have = f"installed {self.installed_version} does not fit" if self.installed_version else "not installed"
        where = {
            "PyTorch extension": "from the PyTorch extension, which picks the CPU or CUDA build for this computer",
            "pip": "from PyPI with pip",
            "shipped copy": f"from the copy shipped with the extension ({self.source}), nothing downloaded",
        }[self.via]
        return f"{self.spec} ({have}) {where}"


class PackageNotShipped(FileNotFoundError):
    """The ``DecipherMRTraining`` folder is in none of the places the module looks."""


def shipped_package_dir(candidates: Sequence[Path] = SHIPPED_PACKAGE_CANDIDATES) -> Path:
    """The folder of the ``decipher-mr`` package shipped with the extension.

    Raises :class:`PackageNotShipped` with the folders it tried and what to do.

    >>> shipped_package_dir()
    PosixPath('.../DecipherMRTraining')
    """
    for folder in candidates:
        if (Path(folder) / "pyproject.toml").is_file():
            return Path(folder)
    looked = "\n".join(f"  {Path(c) / 'pyproject.toml'}" for c in candidates)
    raise PackageNotShipped(
        "DecipherMR cannot find its Python package (decipher-mr, the DecipherMRTraining folder). "
        f"It looked for:\n{looked}\n"
        "An installed extension has it inside the module's folder. From a Slicer build tree, build the "
        "extension again (CMake copies the package there at configure time); from a source checkout, keep "
        "DecipherMRTraining beside the DecipherMR folder. Otherwise reinstall the extension."
    )


def read_pyproject(package_dir: Path) -> dict:
    """The ``[project]`` table of the shipped package's ``pyproject.toml``.

    >>> read_pyproject(shipped_package_dir())["name"]
    'decipher-mr'
    """
    return _toml_loads((Path(package_dir) / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def package_requirements(package_dir: Path) -> List[Tuple[str, str]]:
    """``(name, specifier)`` of the package's runtime dependencies (no extras: Slicer installs no extra).

    >>> package_requirements(shipped_package_dir())[0]
    ('torch', '>=2.4')
    """
    parse, _ = _packaging()
    out = []
    for line in read_pyproject(package_dir).get("dependencies", []):
        req = parse(line)
        if req.marker is None or req.marker.evaluate():
            out.append((req.name, str(req.specifier)))
    return out


def python_problem(package_dir: Path, python_version: Sequence[int]) -> Optional[str]:
    """Why this Python cannot run the package (its ``requires-python``), or None when it can.

    >>> python_problem(shipped_package_dir(), (3, 9, 10))
    'DecipherMR needs Slicer 5.10 or later: ...'
    """
    needed = read_pyproject(package_dir).get("requires-python", "")
    have = ".".join(str(v) for v in python_version[:3])
    if not needed or version_satisfies(have, needed):
        return None
    return (
        f"DecipherMR needs Slicer {FIRST_SLICER_WITH_PYTHON_310} or later: its Python packages (torch among them) "
        f"need Python {needed}, and this Slicer has Python {have}. Please install a newer Slicer."
    )


def check_dependencies(package_dir: Path, pytorch_extension: bool = False, env: PythonEnv = PythonEnv()) -> List[Requirement]:
    """Every runtime dependency of the package with its state, and the package itself; nothing is imported.

    >>> [r.describe() for r in check_dependencies(shipped_package_dir()) if r.missing]
    []
    """
    reqs = [
        Requirement(name, spec, env.installed_version(name), "PyTorch extension" if name == TORCH and pytorch_extension else "pip")
        for name, spec in package_requirements(package_dir)
    ]
    project = read_pyproject(package_dir)
    own = Requirement(project["name"], f"=={project['version']}", env.installed_version(project["name"]), "shipped copy", str(package_dir))
    return reqs + [own]


@dataclass
class InstallPlan:
    """What :func:`install` will do, and the text the user confirms first.

    >>> plan = plan_install(pytorch_extension=True); print(plan.text())
    """

    requirements: List[Requirement] = field(default_factory=list)
    env: PythonEnv = field(default_factory=PythonEnv)
    problem: Optional[str] = None  # set: show it and install nothing
    preview: Optional[List[Tuple[str, str]]] = None  # (name, version) pip's dry run would install
    preview_error: str = ""

    @property
    def missing(self) -> List[Requirement]:
        """The requirements to install; empty when everything is there (or when there is a problem)."""
        return [] if self.problem else [r for r in self.requirements if r.missing]

    @property
    def torch(self) -> Optional[Requirement]:
        return next((r for r in self.requirements if r.name == TORCH), None)

    @property
    def shipped(self) -> Optional[Requirement]:
        return next((r for r in self.requirements if r.via == "shipped copy"), None)

    @property
    def from_pypi(self) -> List[Requirement]:
        """The runtime requirements pip resolves in one call (all of them: pip leaves satisfied ones alone)."""
        return [r for r in self.requirements if r.via == "pip" and r.name != TORCH]

    def text(self) -> str:
        """The one confirmation dialog: every package that would be installed and where it comes from.

        >>> print(plan_install().text())
        Everything DecipherMR needs is installed.
        """
        if self.problem:
            return self.problem
        if not self.missing:
            return "Everything DecipherMR needs is installed."
        lines = [f"DecipherMR needs Python packages that are not in this Slicer yet ({self.env.pip_command[0]}).", ""]
        torch = self.torch
        if torch is not None and torch.missing and (torch.via == "PyTorch extension" or self.preview is None):
            lines.append(f"• {torch.describe()}")  # else it is in pip's list below
        lines += self._pypi_lines()
        shipped = self.shipped
        if shipped is not None and shipped.missing:
            lines.append(f"• {shipped.describe()}")
        if self.preview is not None:
            extension_torch = torch is not None and torch.missing and torch.via == "PyTorch extension"
            total = len(self._pypi_rows()) + extension_torch + (shipped is not None and shipped.missing)
            lines += ["", f"{total} package(s) in all."]
        pinned = [f"{n} {v}" for n, v in self._pins().items()]
        if pinned and not (torch is not None and torch.missing):
            lines += ["", f"Kept as installed (pip is told not to replace them): {', '.join(pinned)}."]
        online = any(r.via != "shipped copy" for r in self.missing)
        lines += ["", "This may take several minutes and needs an internet connection. Continue?" if online else "Continue?"]
        return "\n".join(lines)

    def _pypi_rows(self) -> List[Tuple[str, str]]:
        """pip's dry-run list less torch when the PyTorch extension installs torch."""
        extension_torch = self.torch is not None and self.torch.via == "PyTorch extension"
        return [(n, v) for n, v in self.preview or [] if not (extension_torch and n.lower() == TORCH)]

    def _pypi_lines(self) -> List[str]:
        """The packages pip would install, as its dry run reported them (or, without one, the direct needs)."""
        if self.preview is None:
            needs = [r.spec for r in self.from_pypi if r.missing]
            if not needs:
                return []
            return [
                f"• from PyPI with pip: {', '.join(needs)} and their dependencies (the full list is unknown: "
                f"pip's dry run failed: {self.preview_error or 'not run'})."
            ]
        rows = self._pypi_rows()
        if not rows:
            return []
        out = [f"• from PyPI with pip, {len(rows)} package(s) (pip's own dry run of this install):"]
        for name, version in rows:
            have = self.env.installed_version(name)
            out.append(f"    {name} {version}" + (f" (replaces {have})" if have else ""))
        torch = self.torch
        if torch is not None and torch.missing and torch.via == "PyTorch extension":
            out.append("  (with torch as on PyPI; the PyTorch extension's build may bring other CUDA packages.)")
        return out

    def _pins(self) -> Dict[str, str]:
        """The installed builds no pip call may replace (torch, and torchvision when there)."""
        pins = {name: self.env.installed_version(name) for name in PINNED_FROM_EXTENSION}
        return {name: version for name, version in pins.items() if version}


def plan_install(
    pytorch_extension: bool = False,
    candidates: Sequence[Path] = SHIPPED_PACKAGE_CANDIDATES,
    env: PythonEnv = PythonEnv(),
    python_version: Sequence[int] = tuple(sys.version_info[:3]),
    dry_run: bool = True,
) -> InstallPlan:
    """Check the dependencies and, when some are missing, ask pip what exactly it would install.

    Never raises for a missing package folder or a too old Python: ``plan.problem`` says what is wrong.

    >>> plan = plan_install(pytorch_extension=True)
    >>> plan.missing, plan.text()
    """
    try:
        package_dir = shipped_package_dir(candidates)
    except PackageNotShipped as error:
        return InstallPlan(env=env, problem=str(error))
    problem = python_problem(package_dir, python_version)
    if problem:
        return InstallPlan(env=env, problem=problem)
    plan = InstallPlan(check_dependencies(package_dir, pytorch_extension, env), env)
    if dry_run and any(r.missing for r in plan.from_pypi + [plan.torch] if r is not None):
        try:
            plan.preview = pip_dry_run(plan)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
            plan.preview_error = pip_error_summary(str(error)) or type(error).__name__
    return plan


def pip_error_summary(stderr: str, limit: int = 600) -> str:
    """The lines of pip's error output a user can act on: its first ERROR line and the conflict's cause.

    >>> pip_error_summary("ERROR: No matching distribution found for usesok>=1")
    'ERROR: No matching distribution found for usesok>=1'
    """
    lines = [line.rstrip() for line in stderr.strip().splitlines()]
    first = next((line for line in lines if line.startswith("ERROR:")), lines[-1] if lines else "")
    cause = []
    if "The conflict is caused by:" in lines:
        for line in lines[lines.index("The conflict is caused by:") :]:
            if not line:
                break
            cause.append(line.strip())
    return " ".join([first, *cause])[:limit]


def _pip_args(plan: InstallPlan, constraints: Optional[Path]) -> List[str]:
    """The arguments of the one pip call for everything from PyPI (the dry run uses the same).

    torch is in the list only while it is missing: once installed it is pinned by ``constraints`` instead.
    """
    reqs = [r.spec for r in plan.from_pypi]
    torch = plan.torch
    if torch is not None and torch.missing:
        reqs.insert(0, torch.spec)
    pins = ["-c", str(constraints)] if constraints is not None else []
    return [*plan.env.index_options, *pins, *reqs]


def _write_constraints(pins: Dict[str, str], folder: Path) -> Optional[Path]:
    """A pip constraints file pinning each installed build exactly (``torch==2.5.1+cu121``), or None."""
    if not pins:
        return None
    path = Path(folder) / "constraints.txt"
    path.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()), encoding="utf-8")
    return path


def pip_dry_run(plan: InstallPlan, timeout: float = 300) -> List[Tuple[str, str]]:
    """``(name, version)`` of every package pip would install for ``plan``: its ``--dry-run --report``.

    Same arguments and constraints as the real install; needs pip >= 22.2 (Slicer 5.10 ships 25.1.1).
    ``--retries 0`` makes it fail fast when offline instead of retrying for minutes.

    >>> pip_dry_run(plan_install(dry_run=False))
    [('monai', '1.6.1'), ...]
    """
    with tempfile.TemporaryDirectory(prefix="decipher-mr-plan-") as tmp:
        pins = {} if plan.torch is not None and plan.torch.missing else plan._pins()
        args = _pip_args(plan, _write_constraints(pins, Path(tmp)))
        report = Path(tmp) / "report.json"
        command = [*plan.env.pip_command, "install", "--dry-run", "--quiet", "--retries", "0", "--report", str(report), *args]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or f"pip exited with {done.returncode}")
        return parse_pip_report(report.read_text(encoding="utf-8"))


def parse_pip_report(text: str) -> List[Tuple[str, str]]:
    """``(name, version)`` of each package in a pip installation report (``pip install --report``).

    >>> parse_pip_report('{"install": [{"metadata": {"name": "numpy", "version": "2.4.6"}}]}')
    [('numpy', '2.4.6')]
    """
    items = json.loads(text).get("install", [])
    return sorted(((i["metadata"]["name"], i["metadata"]["version"]) for i in items), key=lambda nv: nv[0].lower())


def install(
    plan: InstallPlan,
    pip_install: Callable[[List[str]], None],
    install_torch: Optional[Callable[..., object]] = None,
) -> List[str]:
    """Install what ``plan`` says is missing, torch first; returns the names installed.

    ``pip_install`` is ``slicer.util.pip_install`` (given a list, so paths with spaces stay whole);
    ``install_torch`` is the PyTorch extension's ``PyTorchUtilsLogic().installTorch`` (called with
    ``torchVersionRequirement``), or None to get torch with pip. Called only after the user confirmed
    ``plan.text()``.

    >>> install(plan, slicer.util.pip_install, PyTorchUtils.PyTorchUtilsLogic().installTorch)
    ['torch', 'numpy', ..., 'decipher-mr']
    """
    if plan.problem:
        raise RuntimeError(plan.problem)
    missing = plan.missing
    torch = plan.torch
    if torch is not None and torch.missing:
        _install_torch(torch, plan.env, pip_install, install_torch)
    if any(r.missing for r in plan.from_pypi):
        with tempfile.TemporaryDirectory(prefix="decipher-mr-pins-") as tmp:
            # The installed torch (just above, or the extension's from before) is pinned in the same pip
            # call, so a dependency that wants another torch makes pip fail instead of replacing the build.
            pip_install(_pip_args(_torch_done(plan), _write_constraints(plan._pins(), Path(tmp))))
    if plan.shipped is not None and plan.shipped.missing:
        install_shipped_copy(Path(plan.shipped.source), pip_install)
    return [r.name for r in missing]


def _torch_done(plan: InstallPlan) -> InstallPlan:
    """The plan as it stands once torch is installed: torch no longer in pip's requirement list."""
    reqs = [Requirement(r.name, r.specifier, plan.env.installed_version(r.name), r.via, r.source) if r.name == TORCH else r for r in plan.requirements]
    return InstallPlan(reqs, plan.env)


def _install_torch(torch: Requirement, env: PythonEnv, pip_install: Callable, install_torch: Optional[Callable]) -> None:
    """torch through the PyTorch extension (with the package's version requirement) or through pip."""
    if torch.via == "PyTorch extension":
        if install_torch is None:
            raise RuntimeError("torch is to come from the PyTorch extension, but no installer for it was given")
        install_torch(askConfirmation=False, torchVersionRequirement=torch.specifier)
    else:
        pip_install([*env.index_options, torch.spec])
    now = env.installed_version(TORCH)
    if now is None or not version_satisfies(now, torch.specifier):
        raise RuntimeError(f"after installing torch, torch is {now or 'still not installed'}, and DecipherMR needs {torch.spec}")


def install_shipped_copy(package_dir: Path, pip_install: Callable[[List[str]], None]) -> None:
    """Install the shipped package from a temporary copy: no index, no build isolation, no dependencies.

    pip builds a local folder in place (``build/``, ``*.egg-info``), so it gets a copy: the extension's
    folder may be read-only and must stay clean. No build isolation means the build backend is Slicer's
    own setuptools (5.10 ships 80.9.0), so no index is needed; the dependencies were installed before.

    >>> install_shipped_copy(shipped_package_dir(), slicer.util.pip_install)
    """
    with tempfile.TemporaryDirectory(prefix="decipher-mr-src-") as tmp:
        copy = Path(tmp) / PACKAGE_FOLDER
        shutil.copytree(package_dir, copy, ignore=COPY_IGNORE)
        for path in [copy, *copy.rglob("*")]:  # a read-only source gives a read-only copy; pip writes into it
            path.chmod(path.stat().st_mode | 0o200)
        pip_install(["--no-index", "--no-build-isolation", "--no-deps", str(copy)])
