"""The Slicer module's dependency check and install (DecipherMRLib/Dependencies.py), with real pip, offline.

pip runs for real in fresh plain venvs (``--without-pip``; this venv's pip drives them with ``--python``)
against tiny wheels written here (a fake ``torch`` 2.5.0 and 2.6.0 among them) with ``--no-index``, so
what is checked is pip's own behaviour: the constraints file, the dry-run report, the offline install of
the shipped package copy. No network, no Slicer application needed.
"""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import importlib.metadata
import io
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DecipherMR"
PACKAGE = ROOT / "DecipherMRTraining"
sys.path.insert(0, str(MODULE))

from DecipherMRLib.Dependencies import (  # noqa: E402
    SHIPPED_PACKAGE_CANDIDATES,
    PythonEnv,
    check_dependencies,
    install,
    install_shipped_copy,
    package_requirements,
    parse_pip_report,
    plan_install,
    read_pyproject,
    shipped_package_dir,
    version_satisfies,
)

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


# --- helpers: wheels, venvs, pip ---------------------------------------------------------------------
def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A valid pure-Python wheel with one module and the given Requires-Dist (the wheel spec, by hand)."""
    mod = name.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(text.encode())])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue()
    out = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
    return out


def make_package(folder: Path, name: str, dependencies: list[str], version: str = "0.1.0") -> Path:
    """A mini project laid out like DecipherMRTraining (pyproject + one package), built by setuptools."""
    folder.mkdir(parents=True)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\nrequires-python = ">=3.10"\ndependencies = [{deps}]\n'
    )
    (folder / name.replace("-", "_")).mkdir()
    (folder / name.replace("-", "_") / "__init__.py").write_text("")
    return folder


def fresh_venv(folder: Path, with_setuptools: bool = True) -> tuple[Path, Path]:
    """A plain venv (no system site-packages, no pip) and its site-packages; setuptools copied in, offline."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=60)
    site = folder / "lib" / PY / "site-packages"
    if with_setuptools:  # this venv's setuptools, file by file from its RECORD: what Slicer's Python has
        dist = importlib.metadata.distribution("setuptools")
        for file in dist.files:
            src = Path(dist.locate_file(file))
            if not str(file).startswith("..") and "__pycache__" not in file.parts and src.is_file():
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, site / file)
    return folder / "bin" / "python", site


def env_for(python: Path, site: Path, wheels: Path | None = None) -> PythonEnv:
    """The fresh venv as the module sees Slicer's Python: pip there, metadata there, local wheels only."""
    index = ("--no-index", "--find-links", str(wheels)) if wheels else ("--no-index",)
    return PythonEnv(pip_command=(sys.executable, "-m", "pip", "--python", str(python)), index_options=index, site_dirs=(str(site),))


def pip_installer(env: PythonEnv, calls: list | None = None):
    """What slicer.util.pip_install does (``python -m pip install *args``, RuntimeError on failure)."""

    def pip_install(args: list[str]) -> None:
        if calls is not None:
            calls.append(list(args))
        done = subprocess.run([*env.pip_command, "install", *args], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)

    return pip_install


@pytest.fixture(autouse=True)
def quiet_pip(monkeypatch):
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_NO_INPUT", "1")


@pytest.fixture
def wheels(tmp_path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "torch", "2.5.0")
    make_wheel(folder, "torch", "2.6.0")
    make_wheel(folder, "helper", "1.0")
    make_wheel(folder, "usesok", "1.0", ("torch>=2.4", "helper>=1"))
    make_wheel(folder, "needsnew", "1.0", ("torch>=2.6",))
    return folder


# --- what is checked ---------------------------------------------------------------------------------
def test_the_check_reads_the_shipped_pyproject_and_imports_nothing():
    package = shipped_package_dir()
    assert package == PACKAGE and SHIPPED_PACKAGE_CANDIDATES[1] == PACKAGE  # a source checkout
    names = [name for name, _ in package_requirements(package)]
    assert names[0] == "torch" and "numpy" in names and "tensorboard" not in names  # no extra
    reqs = check_dependencies(package, pytorch_extension=True)
    by_name = {r.name: r for r in reqs}
    assert by_name["torch"].via == "PyTorch extension"
    assert by_name["decipher-mr"].via == "shipped copy" and by_name["decipher-mr"].source == str(package)
    assert not by_name["numpy"].missing  # installed in this environment
    assert version_satisfies("2.13.0+cpu", ">=2.4") and not version_satisfies("2.3.1", ">=2.4")
    assert version_satisfies("1.4.2", "~=1.4") and not version_satisfies("2.0", "~=1.4")
    script = f"""
import sys
sys.path.insert(0, {str(MODULE)!r})
from DecipherMRLib.Dependencies import plan_install
plan = plan_install(pytorch_extension=True, dry_run=False)
print("HEAVY", sorted(m for m in ("torch", "decipher_mr", "monai", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stderr


def test_plan_names_each_missing_item_once_and_install_runs_torch_first_then_pins_it(tmp_path):
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=99", "numpy>=1.0", "surely-not-installed-pkg>=1"], "9.9.9")
    site = tmp_path / "site"
    site.mkdir()
    env = PythonEnv(pip_command=("false",), site_dirs=(str(site),))  # an empty environment; no pip to ask
    plan = plan_install(pytorch_extension=True, candidates=[package], env=env)
    text = plan.text()
    assert [r.name for r in plan.missing] == ["torch", "numpy", "surely-not-installed-pkg", "decipher-mr"]
    assert text.count("torch>=99") == 1 and "PyTorch extension" in text
    assert "numpy>=1.0, surely-not-installed-pkg>=1 and their dependencies" in text and "dry run failed" in text
    assert "decipher-mr==9.9.9" in text and str(package) in text and "Nothing else" not in text

    calls = []

    def install_torch(askConfirmation, torchVersionRequirement):  # the extension installs torch 99.1
        calls.append(("torch", askConfirmation, torchVersionRequirement))
        (site / "torch-99.1.dist-info").mkdir()
        (site / "torch-99.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 99.1\n")

    def pip_install(args):
        pins = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8") if "-c" in args else None
        copy = Path(args[-1])
        calls.append(("pip", args, pins, (copy / "pyproject.toml").is_file() and copy != package))

    assert install(plan, pip_install, install_torch) == ["torch", "numpy", "surely-not-installed-pkg", "decipher-mr"]
    assert calls[0] == ("torch", False, ">=99")
    assert calls[1][0] == "pip" and calls[1][1][-2:] == ["numpy>=1.0", "surely-not-installed-pkg>=1"]
    assert calls[1][2] == "torch==99.1\n"  # the installed build is pinned in the same pip call
    assert calls[2][1][:3] == ["--no-index", "--no-build-isolation", "--no-deps"] and calls[2][3]  # a copy


def test_a_missing_package_folder_is_a_clear_message_naming_where_it_looked(tmp_path):
    nowhere = [tmp_path / "build" / "lib" / "DecipherMRTraining", tmp_path / "DecipherMRTraining"]
    plan = plan_install(candidates=nowhere)
    assert plan.missing == [] and plan.text() == plan.problem
    for folder in nowhere:
        assert str(folder / "pyproject.toml") in plan.problem
    assert "build the extension again" in plan.problem and "reinstall the extension" in plan.problem
    with pytest.raises(RuntimeError, match="cannot find its Python package"):
        install(plan, pip_install=lambda args: None)


def test_an_old_slicer_gets_a_message_not_a_traceback_and_the_file_passes_vermin_for_39():
    plan = plan_install(python_version=(3, 9, 10), dry_run=False)
    assert plan.problem.startswith("DecipherMR needs Slicer 5.10 or later")
    assert "Python >=3.10" in plan.problem and "3.9.10" in plan.problem
    assert read_pyproject(PACKAGE)["requires-python"] == ">=3.10"
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed")
    target = MODULE / "DecipherMRLib" / "Dependencies.py"
    out = subprocess.run(
        [str(vermin), "--no-tips", "-t=3.9-", "--violations", "--eval-annotations", str(target)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "Target versions not met" not in out.stdout, out.stdout


# --- pip for real, offline ---------------------------------------------------------------------------
def test_without_a_constraint_pip_replaces_torch_and_with_one_it_refuses(tmp_path, wheels):
    python, site = fresh_venv(tmp_path / "venv", with_setuptools=False)
    env = env_for(python, site, wheels)
    pip_installer(env)([*env.index_options, "torch==2.5.0"])
    # The defect: a plain install of a package wanting a newer torch replaces the installed build.
    report = tmp_path / "report.json"
    subprocess.run([*env.pip_command, "install", "--dry-run", "--quiet", "--report", str(report), *env.index_options, "needsnew"], check=True, timeout=120)
    assert ("torch", "2.6.0") in parse_pip_report(report.read_text(encoding="utf-8"))
    # The module's install pins the installed torch in the same pip call: pip fails instead.
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=2.4", "needsnew>=1"])
    plan = plan_install(pytorch_extension=True, candidates=[package], env=env)
    assert plan.preview is None and "needsnew" in plan.preview_error  # the dry run already refuses
    with pytest.raises(RuntimeError, match="(?i)conflict|ResolutionImpossible|cannot install"):
        install(plan, pip_installer(env), install_torch=None)
    assert env.installed_version("torch") == "2.5.0" and env.installed_version("needsnew") is None


def test_the_dialog_lists_what_pip_would_install_and_install_does_exactly_that(tmp_path, wheels):
    python, site = fresh_venv(tmp_path / "venv")
    env = env_for(python, site, wheels)
    pip_installer(env)([*env.index_options, "torch==2.5.0"])  # as the PyTorch extension left it
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=2.4", "usesok>=1"])
    plan = plan_install(pytorch_extension=True, candidates=[package], env=env)
    assert plan.preview == [("helper", "1.0"), ("usesok", "1.0")], plan.preview_error
    text = plan.text()
    assert "2 package(s)" in text and "    helper 1.0" in text and "    usesok 1.0" in text
    assert "Kept as installed (pip is told not to replace them): torch 2.5.0." in text and "decipher-mr==0.1.0" in text
    assert "3 package(s) in all." in text
    calls = []
    assert install(plan, pip_installer(env, calls), install_torch=None) == ["usesok", "decipher-mr"]
    assert env.installed_version("torch") == "2.5.0" and env.installed_version("helper") == "1.0"
    assert env.installed_version("decipher-mr") == "0.1.0"
    assert calls[-1][:3] == ["--no-index", "--no-build-isolation", "--no-deps"]
    assert plan_install(pytorch_extension=True, candidates=[package], env=env).missing == []


def test_torch_from_the_extension_is_one_line_and_not_in_pips_list(tmp_path, wheels):
    python, site = fresh_venv(tmp_path / "venv", with_setuptools=False)
    env = env_for(python, site, wheels)
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=2.4", "usesok>=1"])
    plan = plan_install(pytorch_extension=True, candidates=[package], env=env)
    assert ("torch", "2.6.0") in plan.preview  # pip resolves torch as on the index...
    text = plan.text()
    assert "torch>=2.4 (not installed) from the PyTorch extension" in text and "2 package(s)" in text
    assert "    torch " not in text and "may bring other CUDA packages" in text  # ...the extension installs it


def test_without_the_pytorch_extension_torch_comes_from_pip_with_the_requirement(tmp_path, wheels):
    python, site = fresh_venv(tmp_path / "venv")
    env = env_for(python, site, wheels)
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=2.6", "usesok>=1"])
    plan = plan_install(pytorch_extension=False, candidates=[package], env=env)
    assert plan.preview == [("helper", "1.0"), ("torch", "2.6.0"), ("usesok", "1.0")]
    assert "3 package(s)" in plan.text() and "torch>=2.6 (not installed) from PyPI with pip" not in plan.text()
    calls = []
    install(plan, pip_installer(env, calls), install_torch=None)
    assert calls[0] == [*env.index_options, "torch>=2.6"] and "-c" in calls[1]
    assert env.installed_version("torch") == "2.6.0" and env.installed_version("usesok") == "1.0"


def test_offline_the_dialog_says_so_and_lists_the_direct_requirements(tmp_path):
    python, site = fresh_venv(tmp_path / "venv", with_setuptools=False)
    env = env_for(python, site)  # --no-index and no wheels: as good as offline
    package = make_package(tmp_path / "DecipherMRTraining", "decipher-mr", ["torch>=2.4", "usesok>=1"])
    plan = plan_install(pytorch_extension=True, candidates=[package], env=env)
    assert plan.preview is None and plan.preview_error
    assert "usesok>=1 and their dependencies (the full list is unknown: pip's dry run failed" in plan.text()


def test_the_shipped_package_installs_offline_from_a_read_only_copy_and_imports(tmp_path):
    shipped = tmp_path / "extension" / "DecipherMRTraining"
    shutil.copytree(PACKAGE, shipped, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    python, site = fresh_venv(tmp_path / "venv")
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
    for path in [shipped, *before]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        install_shipped_copy(shipped, pip_installer(env_for(python, site)))
        assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before  # nothing written, nothing added
    finally:
        for path in [shipped, *before]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    # Its dependencies come from this venv, appended after the fresh one's own packages (a plain path
    # line: this venv's .pth files, the editable install among them, are not run).
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run(
        [str(python), "-c", "import decipher_mr.inference.client as c, decipher_mr; print(decipher_mr.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout


# --- runtime versus training dependencies -------------------------------------------------------------
RUNTIME_PARTS = ("inference", "models", "bundle", "data", "index", "heads", "storage.py", "__init__.py", "cli/__init__.py", "cli/worker.py")


def _import_names(distributions: list[str]) -> set[str]:
    """Top-level import names of installed distributions (``tensorboard`` -> ``tensorboard``...)."""
    wanted = {d.lower().replace("_", "-") for d in distributions}
    return {mod for mod, dists in importlib.metadata.packages_distributions().items() if any(d.lower().replace("_", "-") in wanted for d in dists)}


def test_the_runtime_import_path_loads_no_train_extra():
    project = read_pyproject(PACKAGE)
    train = [d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["optional-dependencies"]["train"]]
    assert "tensorboard" in train
    script = """
import sys
import decipher_mr.inference.session, decipher_mr.inference.worker, decipher_mr.inference.outputs, decipher_mr.index
print("LOADED", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split("LOADED", 1)[1].split())
    assert "torch" in loaded and not loaded & _import_names(train), loaded & _import_names(train)


def _guarded_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``try: ... except ImportError``: optional, with a fallback."""
    guarded = set()
    for node in ast.walk(tree):
        caught = " ".join(ast.unparse(h.type) for h in getattr(node, "handlers", []) if h.type is not None)
        if isinstance(node, ast.Try) and re.search(r"\b(ImportError|ModuleNotFoundError)\b", caught):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return guarded


def _extras(package_dir: Path) -> set[str]:
    """Distributions named by the package's optional extras (pyproject [project.optional-dependencies])."""
    import tomllib

    extras = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("optional-dependencies", {})
    return {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-") for reqs in extras.values() for req in reqs}


def _function_local_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a function body: imported on use, not when the module loads."""
    return {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}


def test_every_import_of_the_runtime_code_is_a_runtime_dependency():
    """A module-level import must be a runtime dependency; an import inside a function may instead come
    from an optional extra (e.g. `dicom` for `infer --dicom-seg`): the module still loads without it."""
    runtime = {name.lower().replace("_", "-") for name, _ in package_requirements(PACKAGE)}
    extras = _extras(PACKAGE)
    owners = importlib.metadata.packages_distributions()
    files = [f for part in RUNTIME_PARTS for f in ([PACKAGE / "decipher_mr" / part] if part.endswith(".py") else (PACKAGE / "decipher_mr" / part).rglob("*.py"))]
    undeclared = {}
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"))
        optional = _guarded_imports(tree)
        local = _function_local_imports(tree)
        for node in (n for n in ast.walk(tree) if id(n) not in optional):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top in ("decipher_mr", "__future__"):
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & runtime and not (id(node) in local and dists & extras):
                    undeclared.setdefault(top, []).append(str(file.relative_to(PACKAGE)))
    assert not undeclared, undeclared


# --- the CMake copy into the build tree and the install tree ------------------------------------------
def test_cmake_puts_the_package_beside_the_module_in_the_build_tree_and_the_install(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    lib = "lib/Slicer-5.10/qt-scripted-modules"
    (tmp_path / "src").mkdir()
    # Slicer's macros are stubs here: only the lines of DecipherMR/CMakeLists.txt about the package run.
    (tmp_path / "src" / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(T NONE)\n"
        f"set(Slicer_QTSCRIPTEDMODULES_LIB_DIR {lib})\nset(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR {lib})\n"
        "macro(slicerMacroBuildScriptedModule)\nendmacro()\n"
        f"add_subdirectory({MODULE.as_posix()} DecipherMR)\n"
    )
    build, prefix = tmp_path / "build", tmp_path / "install"
    for command in ([cmake, "-S", str(tmp_path / "src"), "-B", str(build)], [cmake, "--install", str(build), "--prefix", str(prefix), "--component", "RuntimeLibraries"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    for tree in (build / lib, prefix / lib):
        copied = tree / "DecipherMRTraining"
        assert (copied / "pyproject.toml").is_file() and (copied / "decipher_mr" / "inference" / "client.py").is_file()
        assert (copied / "decipher_mr" / "index" / "build.py").is_file()  # "build" is skipped only at the top
        assert not [p for p in copied.rglob("*") if p.name == "__pycache__" or p.name.endswith(".egg-info")]
        # Dependencies.py, where Slicer puts it in that tree, finds this copy by itself.
        (tree / "DecipherMRLib").mkdir()
        shutil.copy(MODULE / "DecipherMRLib" / "Dependencies.py", tree / "DecipherMRLib" / "Dependencies.py")
        script = "from DecipherMRLib.Dependencies import shipped_package_dir; print(shipped_package_dir())"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tree)
        assert out.returncode == 0 and Path(out.stdout.strip()) == copied, out.stderr
