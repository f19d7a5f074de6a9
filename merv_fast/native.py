"""The optional native library merv_fast._C (built by setup.py from CMakeLists.txt and kernels/csrc/).

Importing it registers the merv_fast::* ops with torch. Everything that uses an op checks `native_available()` and
otherwise takes its Python path, so an install without a C++ toolchain loses speed, never function.
"""

from __future__ import annotations

import functools
import json
import re
import sys
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
    # A library built against another torch may load and still misbehave (ABI drift): refuse it, say so once.
    mismatch = torch_version_mismatch(torch.ops.merv_fast.build_info(), torch.__version__)
    if mismatch:
        print(f"merv_fast: not using the native library ({mismatch}); the torch fallbacks run instead. "
              f"Rebuild: pip install --no-build-isolation -e .", file=sys.stderr, flush=True)
        return mismatch
    return None


def _release(version: str) -> tuple[int, ...] | None:
    found = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(v) for v in found.groups()) if found else None


def torch_version_mismatch(build_info: str, running: str) -> str | None:
    """None when the torch the library was built against (build_info's 'torch: X.Y.Z') is the running torch's
    release X.Y.Z (local tags such as +cpu and pre-release suffixes are not compared); else why not."""
    found = re.search(r"torch: ([0-9.]+)", build_info)
    built = _release(found.group(1)) if found else None
    if built is None:
        return f"the library does not say which torch it was built against ({build_info!r})"
    if built != _release(running):
        return f"built against torch {found.group(1)}, running torch {running}"
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


def op_reason(name: str) -> str | None:
    """None when the native op torch.ops.merv_fast.<name> may run (library loaded, same torch, op registered)."""
    reason = _load()
    if reason is None and not hasattr(__import__("torch").ops.merv_fast, name):
        reason = f"the native library has no op merv_fast::{name} (an older build? reinstall)"
    return reason


def build_info() -> str | None:
    """The library's own account of its build (compiler, C++ standard, OpenMP, torch), or None without it."""
    if not native_available():
        return None
    import torch

    return torch.ops.merv_fast.build_info()
