"""Repo-wide pytest hooks: a Python that lacks merv-fast or one of its requirements is told what to install; the session
header names every requirement's installed version (when a new release of a dependency breaks the suite, the log's
first lines say which); tests marked `gpu` are skipped without CUDA."""

import importlib.util
import sys
from pathlib import Path

import pytest


def _test_setup_problem() -> str | None:
    """merv_fast/dependencies.py's check, loaded from this checkout by path: it must run in a Python where merv_fast
    itself is not importable (not installed, and the checkout's root not on sys.path); it needs the standard library
    only."""
    spec = importlib.util.spec_from_file_location("_merv_fast_setup_check",
                                                  Path(__file__).parent / "merv_fast" / "dependencies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.test_setup_problem()


# Checked as this file loads, before pytest imports the folders' conftest files (bench/conftest.py imports torch):
# a Python without merv-fast installed gets one message saying what to install, not an ImportError from a conftest.
# SystemExit, not pytest.exit: pytest reports any Exception raised here as a failed conftest import with a traceback.
_problem = _test_setup_problem()
if _problem:
    print(f"ERROR: {_problem}", file=sys.stderr)
    raise SystemExit(pytest.ExitCode.USAGE_ERROR)


def pytest_report_header(config):
    from merv_fast.dependencies import format_versions, requirement_versions

    return [f"merv-fast requirements: {format_versions(requirement_versions())}"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
