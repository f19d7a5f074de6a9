"""Triton kernel tests. They run on a GPU, or on the CPU in Triton's interpreter, which must be switched on
before triton is imported: `TRITON_INTERPRET=1 python -m pytest tests/kernels/triton`. The ordinary test run
starts that process itself (tests/kernels/test_triton_interpreter.py), so the rest of the suite keeps its speed."""

import os

import pytest
import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees the whole session's items: touch only this folder's.
    here = [item for item in items if "tests/kernels/triton" in str(item.fspath)]
    if torch.cuda.is_available() and not INTERPRETER:
        for item in here:  # on a GPU they belong to the `-m gpu` run of the GPU suite
            item.add_marker(pytest.mark.gpu)
    elif not INTERPRETER:
        skip = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (run in their own process)")
        for item in here:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
