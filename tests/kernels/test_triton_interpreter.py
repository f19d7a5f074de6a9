"""Runs tests/kernels/triton in its own process with TRITON_INTERPRET=1: the interpreter is process-wide and slow,
so it stays out of this process. On a GPU machine those tests run directly on CUDA instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRITON_TESTS = Path(__file__).parent / "triton"


def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton tests run on CUDA, marked gpu (merv-fast gpu-suite)")
    if not any(TRITON_TESTS.glob("test_*.py")):
        pytest.skip("no Triton kernel tests yet")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TRITON_TESTS)],
                          env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(done.stdout.splitlines()[-30:])
    assert done.returncode == 0, f"Triton interpreter tests failed:\n{tail}\n{done.stderr[-2000:]}"
    assert " passed" in tail.splitlines()[-1], tail
