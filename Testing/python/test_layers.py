"""The layers of the data flow: model code (``decipher_mr.models``) never imports training code
(``decipher_mr.train``), so the inference engine, the Slicer worker and the viewer load models without
the trainers; training code may use the models."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "DecipherMRTraining" / "decipher_mr"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_model_file_imports_training_code():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("decipher_mr.train"))
                 for p in sorted((PACKAGE / "models").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_model_module_loads_no_training_module():
    modules = [f"decipher_mr.models.{p.stem}" for p in sorted((PACKAGE / "models").glob("*.py")) if p.stem != "__init__"]
    script = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m.startswith('decipher_mr.train')))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_run_folder_without_an_export_is_a_clear_error_in_model_code(tmp_path):
    from decipher_mr.models import load_vision_encoder

    with pytest.raises(FileNotFoundError, match="no encoder.safetensors.*--export-teacher"):
        load_vision_encoder(tmp_path)
