"""The optional native library merv_fast._C (built by setup.py from CMakeLists.txt and kernels/csrc/).

Importing it registers the merv_fast::* ops with torch. Everything that uses an op checks `native_available()` and
otherwise takes its Python path, so an install without a C++ toolchain loses speed, never function.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
STATUS_FILE = PACKAGE_DIR / "_native_status.json"  # written by setup.py's build step: built, or why not


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Import the library once; None on success, else why it is not there."""
    import torch  # noqa: F401  (libtorch must be loaded before the library that links it registers its ops)

    try:
        import merv_fast._C  # noqa: F401
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "merv_fast._C":
            return _why_not_built()
        return f"the library exists but does not load: {err}"  # e.g. built against another torch
    return None


def _why_not_built() -> str:
    try:
        return json.loads(STATUS_FILE.read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return "not built: no merv_fast/_C library, and no record of a native build (install with pip)"


def native_available() -> bool:
    return _load() is None


def native_reason() -> str:
    """'built' when the library loaded, else why it did not (not built at install time, or the import error)."""
    return _load() or "built"


def build_info() -> str | None:
    """The library's own account of its build (compiler, C++ standard, OpenMP, torch), or None without it."""
    if not native_available():
        return None
    import torch

    return torch.ops.merv_fast.build_info()
