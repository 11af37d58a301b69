"""Which 3D Slicer runs the module, decided without importing anything heavy.

The engine (torch, transformers and monai at the versions the package pins) needs Python 3.10 or newer;
Slicer 5.6 and 5.8 ship Python 3.9.10 and Slicer 5.10 ships 3.12.10 (``Slicer_REQUIRED_PYTHON_VERSION``
in Slicer's ``CMakeLists.txt`` at v5.6.2, v5.8.1 and v5.10.0; see docs/slicer-compatibility.md). The
module's own files import on Python 3.9, so an older Slicer loads the module and the panel shows this
message instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

OLDEST_SLICER = (5, 10)
OLDEST_PYTHON = (3, 10)


def unsupported_reason(slicer_version: Sequence[int], python_version: Sequence[int] = tuple(sys.version_info[:3])) -> Optional[str]:
    """Why this Slicer cannot run DecipherMR, or None when it can.

    >>> unsupported_reason((5, 8), (3, 9, 10))
    'DecipherMR needs 3D Slicer 5.10 or newer (this is Slicer 5.8 with Python 3.9.10). ...'
    """
    slicer_major_minor = tuple(int(v) for v in tuple(slicer_version)[:2])
    python = tuple(int(v) for v in tuple(python_version)[:3])
    if slicer_major_minor >= OLDEST_SLICER and python[:2] >= OLDEST_PYTHON:
        return None
    have = f"Slicer {'.'.join(map(str, slicer_major_minor))} with Python {'.'.join(map(str, python))}"
    return (
        f"DecipherMR needs 3D Slicer {OLDEST_SLICER[0]}.{OLDEST_SLICER[1]} or newer (this is {have}). "
        f"Its model engine (PyTorch, transformers, MONAI) needs Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} "
        "or newer, which Slicer ships from 5.10 on. Install the current Slicer from download.slicer.org; "
        "nothing has been installed or changed."
    )
