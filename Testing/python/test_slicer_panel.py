"""The module's panel as Slicer builds it: every parameter the .ui binds meets the rules of Slicer's GUI
connectors, a bundle folder can be chosen, the inputs are remembered without overwriting each other,
the module's own files import on the oldest Python a Slicer may bring, and an old Slicer gets a message.

The Slicer application cannot run here. The connector rules below are the ones Slicer's own
``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` applies (v5.6.2 to v5.10.0; file and lines in
docs/slicer-compatibility.md); the settings are written through real Qt (PySide6's QSettings, the same
class PythonQt wraps in Slicer); the Python-version check is vermin's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DecipherMR"
MODULE_FILE = MODULE / "DecipherMR.py"
UI_FILE = MODULE / "Resources" / "UI" / "DecipherMR.ui"
sys.path.insert(0, str(MODULE))

from DecipherMRLib.Compatibility import unsupported_reason  # noqa: E402
from DecipherMRLib.ModelsFolder import user_cache_base as module_cache_base  # noqa: E402
from DecipherMRLib.PanelInputs import DEVICES, SETTINGS_KEYS, bundle_location, remember_inputs, remembered_inputs  # noqa: E402

# --- Slicer's GUI connector rules (guiConnectors.py) ------------------------------------------------------
COMBO_BOXES = {"QComboBox", "ctkComboBox"}  # QComboBoxToStringableConnector: needs a Choice annotation
BOUNDED_SLIDERS = {"ctkSliderWidget", "qMRMLSliderWidget"}  # refuses an unbounded float or int
FLOAT_WIDGETS = BOUNDED_SLIDERS | {"QDoubleSpinBox", "ctkDoubleSlider", "ctkDoubleSpinBox", "qMRMLSpinBox"}
STR_WIDGETS = {"QLineEdit", "QLabel", "QTextEdit", "QPlainTextEdit"}
NODE_WIDGETS = {"qMRMLNodeComboBox"}
INT_WIDGETS = {"QSpinBox", "QSlider"}  # QSliderOrSpinBoxToIntConnector: int only; a QSlider needs bounds


def ui_bindings(ui_text: str) -> dict[str, str]:
    """Parameter name -> widget class, for every widget the .ui binds with ``SlicerParameterName``."""
    bound = {}
    for widget in ET.fromstring(ui_text).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    return bound


def parameter_annotations(source: str, class_name: str = "DecipherMRParameterNode") -> dict[str, tuple[str, dict, object]]:
    """Field -> (type name, {validator name: call}, default) of the parameter node class."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        ann, validators = stmt.annotation, {}
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value).endswith("Annotated"):
            parts = ann.slice.elts
            ann = parts[0]
            validators = {ast.unparse(p.func).split(".")[-1]: p for p in parts[1:] if isinstance(p, ast.Call)}
        default = ast.literal_eval(stmt.value) if stmt.value is not None else None
        fields[stmt.target.id] = (ast.unparse(ann), validators, default)
    return fields


def connector_problems(ui_text: str, source: str) -> list[str]:
    """What Slicer's connectGui would refuse (each a RuntimeError that stops the panel's setup)."""
    fields = parameter_annotations(source)
    problems = []
    for name, widget in ui_bindings(ui_text).items():
        if name not in fields:
            problems.append(f"{name}: bound by the .ui but not a parameter")
            continue
        type_name, validators, default = fields[name]
        if widget in COMBO_BOXES:
            if type_name not in ("str", "int", "float", "bool"):
                problems.append(f"{name}: a {widget} represents str/int/float/bool, not {type_name}")
            elif "Choice" not in validators:
                problems.append(f"{name}: a {widget} bound to {type_name} needs a Choice annotation")
        elif widget in FLOAT_WIDGETS:
            if type_name not in ("float", "int"):
                problems.append(f"{name}: a {widget} represents float/int, not {type_name}")
            elif widget in BOUNDED_SLIDERS and "WithinRange" not in validators and not {"Minimum", "Maximum"} <= set(validators):
                problems.append(f"{name}: a {widget} bound to {type_name} needs WithinRange (or Minimum and Maximum)")
            elif "WithinRange" in validators:
                low, high = (ast.literal_eval(a) for a in validators["WithinRange"].args)
                if default is not None and not low <= default <= high:
                    problems.append(f"{name}: default {default} outside WithinRange({low}, {high})")
        elif widget in INT_WIDGETS:
            if type_name != "int":
                problems.append(f"{name}: a {widget} represents int, not {type_name}")
            elif widget == "QSlider" and "WithinRange" not in validators and not {"Minimum", "Maximum"} <= set(validators):
                problems.append(f"{name}: a QSlider bound to int needs WithinRange (or Minimum and Maximum)")
        elif widget in STR_WIDGETS:
            if type_name != "str":
                problems.append(f"{name}: a {widget} represents str, not {type_name}")
        elif widget in NODE_WIDGETS:
            if not type_name.startswith("slicer.vtkMRML"):
                problems.append(f"{name}: a {widget} represents an MRML node, not {type_name}")
        else:
            problems.append(f"{name}: no Slicer GUI connector takes a {widget}")
    return problems


def test_every_parameter_the_ui_binds_meets_slicers_gui_connector_rules():
    ui_text, source = UI_FILE.read_text(encoding="utf-8"), MODULE_FILE.read_text(encoding="utf-8")
    bound = ui_bindings(ui_text)
    assert {"device": "QComboBox", "opacity": "ctkSliderWidget", "threshold": "ctkSliderWidget"}.items() <= bound.items()
    assert connector_problems(ui_text, source) == []


def test_the_connector_rules_refuse_the_bare_declarations_that_stopped_the_panel():
    ui_text = UI_FILE.read_text(encoding="utf-8")
    before = '''
@parameterNodeWrapper
class DecipherMRParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    bundlePath: str = ""
    device: str = "auto"
    indexPath: str = ""
    engine: str = "local"
    enginePort: int = 0
    remoteCommand: str = ""
    query: str = ""
    opacity: float = 0.5
    threshold: float = 0.5
'''
    problems = connector_problems(ui_text, before)
    assert len(problems) == 3 and any(p.startswith("device:") and "Choice" in p for p in problems)
    assert any(p.startswith("opacity:") and "WithinRange" in p for p in problems)


def test_device_choices_are_the_panels_devices_and_the_default_is_one_of_them():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    choices = next(ast.literal_eval(n.value) for n in tree.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEVICE_CHOICES")
    assert tuple(choices) == DEVICES
    _, validators, default = parameter_annotations(source)["device"]
    assert ast.unparse(validators["Choice"].args[0]) == "DEVICE_CHOICES" and default in DEVICES


# --- the bundle path ---------------------------------------------------------------------------------------
def test_a_bundle_is_a_zip_a_folder_or_the_folder_of_a_picked_config_json(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert bundle_location(str(folder / "config.json")) == str(folder)
    assert bundle_location(str(folder)) == str(folder)
    assert bundle_location(str(tmp_path / "demo.zip")) == str(tmp_path / "demo.zip")
    assert bundle_location("  ") == ""
    # A typed path that is not (yet) an existing config.json is left as typed.
    assert bundle_location(str(tmp_path / "elsewhere" / "config.json")) == str(tmp_path / "elsewhere" / "config.json")


def test_the_bundle_path_edit_gets_no_name_filter_validator_and_a_folder_button():
    # ctkPathLineEdit turns name filters into a QRegularExpressionValidator built from their "*.ext"
    # patterns only (CTK Libs/Widgets/ctkPathLineEdit.cpp updateFilter, Libs/Core/ctkUtils.cpp), and emits
    # currentPathChanged only for acceptable input: any filter would make a folder unchoosable.
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "self.ui.bundlePathLineEdit.nameFilters = []" in source
    assert "bundleFolderButton" in ui_bindings_and_names(UI_FILE.read_text(encoding="utf-8"))
    assert "getExistingDirectory" in source


def ui_bindings_and_names(ui_text: str) -> set[str]:
    return {w.get("name") for w in ET.fromstring(ui_text).iter("widget")}


def test_results_selection_is_connected_once_not_after_every_retrieval():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DecipherMRWidget")
    where = [fn.name for fn in widget.body if isinstance(fn, ast.FunctionDef)
             and "currentRowChanged.connect" in ast.get_source_segment(source, fn)]
    assert where == ["setup"]


# --- remembered inputs, through real QSettings -------------------------------------------------------------
@pytest.fixture()
def qsettings(tmp_path):
    QtCore = pytest.importorskip("PySide6.QtCore")
    return QtCore.QSettings(str(tmp_path / "Slicer.ini"), QtCore.QSettings.Format.IniFormat)


def test_remembered_inputs_come_back_together_and_an_unknown_device_is_dropped(qsettings):
    assert remembered_inputs(qsettings) == {}
    remember_inputs(qsettings, {"bundlePath": "/models/demo.zip", "device": "cuda", "indexPath": "/models/index"})
    qsettings.sync()
    assert remembered_inputs(qsettings) == {"bundlePath": "/models/demo.zip", "device": "cuda", "indexPath": "/models/index"}
    qsettings.setValue(SETTINGS_KEYS["device"], "mps")  # a value the combo box cannot show (Choice would raise)
    assert remembered_inputs(qsettings) == {"bundlePath": "/models/demo.zip", "indexPath": "/models/index"}


def test_remembering_writes_only_what_changed(qsettings, tmp_path):
    inputs = {"bundlePath": "/models/demo.zip", "device": "cpu", "indexPath": ""}
    assert remember_inputs(qsettings, inputs) == ["bundlePath", "device"]  # "" is what an unset index reads as
    qsettings.sync()
    written = (tmp_path / "Slicer.ini").read_bytes()
    assert remember_inputs(qsettings, inputs) == []  # nothing new: nothing written
    assert remember_inputs(qsettings, {**inputs, "device": "cuda"}) == ["device"]
    qsettings.sync()
    assert (tmp_path / "Slicer.ini").read_bytes() != written
    assert remembered_inputs(qsettings)["bundlePath"] == "/models/demo.zip"


def test_settings_are_written_on_a_run_or_on_leaving_never_while_the_buttons_update():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DecipherMRWidget")
    writers = sorted(fn.name for fn in widget.body if isinstance(fn, ast.FunctionDef)
                     and ("rememberInputs()" in ast.get_source_segment(source, fn) or "setValue" in ast.get_source_segment(source, fn)))
    assert writers == ["_run", "cleanup", "exit"]


# --- supported Slicer versions -----------------------------------------------------------------------------
def test_an_older_slicer_gets_a_message_naming_what_it_needs():
    message = unsupported_reason((5, 8), (3, 9, 10))
    assert message and "5.10 or newer" in message and "Slicer 5.8 with Python 3.9.10" in message
    assert unsupported_reason((5, 6, 2), (3, 9, 10))
    assert unsupported_reason((5, 10), (3, 12, 10)) is None
    assert unsupported_reason((6, 0), (3, 13, 1)) is None
    assert unsupported_reason((5, 10), (3, 9, 18))  # a custom build on an old Python


def test_module_files_import_on_python_3_9_the_oldest_a_slicer_may_bring():
    files = [str(MODULE_FILE), *sorted(str(p) for p in (MODULE / "DecipherMRLib").glob("*.py"))]
    vermin = Path(sys.executable).with_name("vermin")
    out = subprocess.run([str(vermin), "--no-tips", "--violations", "-t=3.9-", "--eval-annotations", *files],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the per-user models folder ----------------------------------------------------------------------------
@pytest.mark.parametrize("platform, env, expected", [
    ("win32", {"LOCALAPPDATA": "C:/Users/me/AppData/Local"}, "C:/Users/me/AppData/Local/decipher-mr/Cache"),
    ("win32", {}, "/home/me/AppData/Local/decipher-mr/Cache"),
    ("darwin", {"XDG_CACHE_HOME": "/tmp/xdg"}, "/home/me/Library/Caches/decipher-mr"),
    ("linux", {"XDG_CACHE_HOME": "/tmp/xdg"}, "/tmp/xdg/decipher-mr"),
    ("linux", {}, "/home/me/.cache/decipher-mr"),
    ("darwin", {"DECIPHER_MR_CACHE": "/data/dmr"}, "/data/dmr"),
])
def test_models_folder_is_the_platforms_cache_and_the_engines_rule(platform, env, expected):
    from decipher_mr.bundle.archive import user_cache_base as engine_cache_base

    home = Path("/home/me")
    assert module_cache_base(platform, env, home) == Path(expected)
    assert engine_cache_base(platform, env, home) == Path(expected)
