"""Build hook: the wheel also carries the Slicer module's Qt-free core (``DecipherMR/DecipherMRLib``).

``decipher-mr view`` drives that code on its own scene (see ``decipher_mr.viewer``). In a source checkout
it is found beside this folder; a wheel built from the checkout gets a copy under
``decipher_mr/viewer/slicer_module/DecipherMRLib`` (a plain folder, not a package of ``decipher_mr``, so
the Slicer module's own copy is never shadowed). Editable installs and builds without the module folder
(3D Slicer installs this package from the copy inside the extension, where the module is its own) skip it.
All other metadata is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODULE_LIB = Path(__file__).resolve().parent.parent / "DecipherMR" / "DecipherMRLib"
VENDORED = ("decipher_mr", "viewer", "slicer_module", "DecipherMRLib")


class BuildPyWithModuleLib(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not (MODULE_LIB / "__init__.py").is_file():
            return
        dest = Path(self.build_lib).joinpath(*VENDORED)
        shutil.rmtree(dest, ignore_errors=True)  # a reused build folder must not keep files the module dropped
        dest.mkdir(parents=True)
        for source in sorted(MODULE_LIB.glob("*.py")):
            self.copy_file(str(source), str(dest / source.name))


setup(cmdclass={"build_py": BuildPyWithModuleLib})
