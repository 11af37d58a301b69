"""The DecipherMR browser viewer: Slicer's MRML scene and views served to a web page with trame-slicer.

``decipher-mr view`` runs :class:`~decipher_mr.viewer.app.ViewerApp`. The panel's actions (segment,
anomaly overlay, text query, similar reports, case search, open a case) are the Slicer module's own:
the viewer drives ``DecipherMRLib.ModuleLogic`` on the viewer's scene, and that logic talks to the same
inference engine (the ``decipher-mr worker`` process or an in-process ``Session``). Nothing of the
module is implemented twice; only the page is new.

>>> from decipher_mr.viewer import module_lib
>>> ModuleLogic = module_lib().ModuleLogic
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

MODULE_DIR_ENV = "DECIPHER_MR_SLICER_MODULE"
VENDORED_DIR = Path(__file__).resolve().parent / "slicer_module"


def module_dir_candidates() -> list[Path]:
    """Where the Slicer module's ``DecipherMRLib`` may be, first match wins.

    1. the folder named by ``$DECIPHER_MR_SLICER_MODULE`` (the module folder, the one holding
       ``DecipherMR.py``);
    2. ``slicer_module/`` beside this file: the copy a wheel carries (``setup.py`` puts it there when the
       wheel is built from a checkout), so ``pip install decipher_mr-*.whl`` on a server is complete;
    3. ``DecipherMR/`` of the source checkout this package is installed from (``pip install -e``).
    """
    found = []
    if os.environ.get(MODULE_DIR_ENV):
        found.append(Path(os.environ[MODULE_DIR_ENV]).expanduser())
    found.append(VENDORED_DIR)
    found.append(Path(__file__).resolve().parents[3] / "DecipherMR")
    return found


def module_lib() -> ModuleType:
    """Import ``DecipherMRLib`` (the Slicer module's Qt-free core) and return the package.

    >>> lib = module_lib(); lib.load_volume_file
    """
    try:
        return importlib.import_module("DecipherMRLib")
    except ImportError:
        pass
    for folder in module_dir_candidates():
        if (folder / "DecipherMRLib" / "__init__.py").is_file():
            sys.path.insert(0, str(folder))
            return importlib.import_module("DecipherMRLib")
    tried = ", ".join(str(p) for p in module_dir_candidates())
    raise ImportError(
        f"the DecipherMR Slicer module's library (DecipherMRLib) was not found (looked in {tried}); "
        f"set {MODULE_DIR_ENV} to the module folder of a DecipherMR checkout"
    )
