"""Triton kernel tests. They run on a GPU, or on the CPU in Triton's interpreter, which must be switched on
before triton is imported: `TRITON_INTERPRET=1 python -m pytest tests/kernels/triton`. The ordinary test run
starts that process itself (tests/kernels/test_triton_interpreter.py), so the rest of the suite keeps its speed."""

import os

import pytest
import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if INTERPRETER or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (run in their own process)")
    for item in items:
        if "tests/kernels/triton" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
