"""The native library merv_fast._C: loaded and describing its build, or absent with a reason."""

import pytest

from merv_fast import native


def test_reason_is_always_given():
    assert native.native_reason()
    assert (native.build_info() is None) == (not native.native_available())


def test_build_info_describes_the_build():
    if not native.native_available():
        pytest.skip(f"native library not available: {native.native_reason()}")
    info = native.build_info()
    assert "compiler:" in info and ("gcc" in info or "clang" in info)
    assert "C++17" in info and "OpenMP:" in info
    import torch

    assert f"torch: {torch.__version__.split('+')[0]}" in info  # built against the torch that runs it
