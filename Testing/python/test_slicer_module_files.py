"""The Slicer module's files: the .ui parses with real Qt and holds every widget the code uses, the module
file imports nothing heavy, the CMake lists name every file, and the icons are what Slicer expects."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DecipherMR"
MODULE_FILE = MODULE / "DecipherMR.py"
UI_FILE = MODULE / "Resources" / "UI" / "DecipherMR.ui"

# What Slicer itself provides, or what is cheap; anything else at file scope would slow Slicer's start.
LIGHT_MODULES = {"logging", "qt", "ctk", "vtk", "slicer", "os", "sys", "pathlib", "typing", "__future__"}


def ui_names_used_by_module() -> set[str]:
    return set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_FILE.read_text(encoding="utf-8")))


def test_ui_file_loads_with_qt_and_has_every_widget_the_module_uses():
    pytest.importorskip("PySide6.QtUiTools")
    script = f"""
import sys
from PySide6.QtCore import QFile
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import QApplication, QWidget
app = QApplication([])
f = QFile({str(UI_FILE)!r}); assert f.open(QFile.ReadOnly)
root = QUiLoader().load(f)
assert root is not None and root.objectName() == "DecipherMR"
for w in root.findChildren(QWidget):
    if w.objectName():
        print("WIDGET", w.objectName(), w.property("SlicerParameterName") or "")
"""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "WIDGET":
            found[parts[1]] = parts[2] if len(parts) > 2 else ""
    used = ui_names_used_by_module()
    assert used, "the module uses no widgets?"
    assert not used - set(found), f"widgets used by DecipherMR.py but missing from the .ui: {sorted(used - set(found))}"
    # Every parameter the .ui binds exists on the parameter node.
    source = MODULE_FILE.read_text(encoding="utf-8")
    block = source.split("class DecipherMRParameterNode:")[1].split("\nclass ")[0]
    parameters = set(re.findall(r"^\s+(\w+):", block, re.M))
    bound = {p for p in found.values() if p}
    assert bound and bound <= parameters, bound - parameters


def test_module_file_imports_nothing_heavy_at_file_scope():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    top_level = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top_level.append((node.module or "").split(".")[0])
    heavy = [name for name in top_level if name not in LIGHT_MODULES]
    assert not heavy, f"heavy imports at file scope of DecipherMR.py: {heavy}"
    # No install and no engine in any constructor either.
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"):
            text = ast.get_source_segment(MODULE_FILE.read_text(encoding="utf-8"), fn)
            assert "pip_install" not in text and "import torch" not in text and "decipher_mr" not in text, cls.name


def test_importing_the_library_loads_neither_torch_nor_the_engine():
    script = f"""
import sys
sys.path.insert(0, {str(MODULE)!r})
import DecipherMRLib, DecipherMRLib.ModuleLogic, DecipherMRLib.Engine, DecipherMRLib.Dependencies
heavy = sorted(m for m in ("torch", "decipher_mr", "monai", "transformers", "SimpleITK", "PySide6") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_module_declares_title_category_help_acknowledgement_and_citation():
    text = MODULE_FILE.read_text(encoding="utf-8")
    for needle in ('parent.title = "DecipherMR"', "parent.categories", "parent.helpText", "parent.acknowledgementText", "2509.21249"):
        assert needle in text, needle
    for cls in ("class DecipherMR(", "class DecipherMRWidget(", "class DecipherMRLogic(", "class DecipherMRTest("):
        assert cls in text, cls
    assert "qt.QTimer" in text and "runner.cancel" in text  # long work is polled, never waited on in the GUI


def test_module_cmake_lists_every_script_and_resource_on_disk():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "DecipherMR")
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, re.M))
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*") if p.suffix in (".py", ".png", ".ui") and "__pycache__" not in p.parts}
    assert listed == on_disk, (on_disk - listed, listed - on_disk)


def test_extension_cmake_has_the_metadata_slicer_needs():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(DecipherMR)" in cmake and "add_subdirectory(DecipherMR)" in cmake
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', cmake), key
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', cmake)


def test_extension_urls_name_a_repository_that_starts_with_slicer():
    # The Extensions Index's description check: the repository of an extension must be named Slicer*.
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = {key: re.search(rf'set\(EXTENSION_{key} "([^"]+)"\)', cmake).group(1).split() for key in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS")}
    assert len(urls["SCREENSHOTURLS"]) == 4
    for key, values in urls.items():
        for url in values:
            repository = re.match(r"https://(?:github\.com|raw\.githubusercontent\.com)/[^/]+/([^/#]+)", url).group(1)
            assert repository.startswith("Slicer"), (key, url)
            if key != "HOMEPAGE":  # the pictures the index shows exist in this repository at that path
                assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
    module_help = MODULE_FILE.read_text(encoding="utf-8")
    assert urls["HOMEPAGE"][0] in module_help


def test_module_self_test_is_registered_as_a_ctest():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", cmake, re.S)
    assert block and re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", block.group(1))
    source = MODULE_FILE.read_text(encoding="utf-8")
    run_test = source.split("    def runTest(self):", 1)[1].split("\n    def ", 1)[0]
    assert "self.test_panel_enables_its_buttons_for_a_volume_and_a_bundle_folder()" in run_test


def test_icons_are_128_pixel_pngs_and_the_same_image():
    from PIL import Image

    module_icon, extension_icon = MODULE / "Resources/Icons/DecipherMR.png", ROOT / "Resources/Icons/DecipherMR.png"
    for path in (module_icon, extension_icon):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (128, 128), path
    assert module_icon.read_bytes() == extension_icon.read_bytes()
