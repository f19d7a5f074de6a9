"""The kernel backend switch: precedence of its three settings and what each request resolves to."""

import pytest
import torch

from merv_fast.kernels import dispatch
from merv_fast.kernels.dispatch import BackendError, requested_backend, resolve_backend, set_backend, use_backend


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    """Every test starts from: nothing pinned, no MERV_FAST_KERNELS, no interpreter, default 'auto'."""
    monkeypatch.delenv("MERV_FAST_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_backend("auto")
    yield
    set_backend("auto")


def pretend_triton(monkeypatch, available: bool):
    reason = "triton 9.9" if available else "the 'triton' package cannot be imported (ModuleNotFoundError: x)"
    monkeypatch.setattr(dispatch, "triton_available", lambda: (available, reason))


CPU = torch.zeros(2)


def test_default_is_auto_from_config():
    assert requested_backend() == ("auto", "the configured default")


def test_precedence_use_backend_then_env_then_config(monkeypatch):
    set_backend("torch")
    assert requested_backend()[0] == "torch"
    monkeypatch.setenv("MERV_FAST_KERNELS", "triton")
    assert requested_backend() == ("triton", "MERV_FAST_KERNELS")
    with use_backend("auto"):
        assert requested_backend() == ("auto", "use_backend()")
        with use_backend("torch"):
            assert requested_backend()[0] == "torch"
        assert requested_backend()[0] == "auto"
    assert requested_backend()[0] == "triton"


def test_env_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("MERV_FAST_KERNELS", "torch")
    assert requested_backend()[0] == "torch"
    monkeypatch.setenv("MERV_FAST_KERNELS", "auto")
    assert requested_backend()[0] == "auto"


@pytest.mark.parametrize("where", ["env", "set_backend", "use_backend"])
def test_unknown_backend_is_rejected(monkeypatch, where):
    with pytest.raises(ValueError, match="cuda-magic"):
        if where == "env":
            monkeypatch.setenv("MERV_FAST_KERNELS", "cuda-magic")
            requested_backend()
        elif where == "set_backend":
            set_backend("cuda-magic")
        else:
            with use_backend("cuda-magic"):
                pass


def test_auto_on_cpu_is_torch_without_interpreter(monkeypatch):
    pretend_triton(monkeypatch, True)
    assert resolve_backend(CPU) == "torch"
    assert resolve_backend() == "torch"


def test_auto_on_cpu_uses_interpreter_when_asked(monkeypatch):
    pretend_triton(monkeypatch, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU, None) == "triton"


def test_auto_without_triton_is_torch_even_with_interpreter(monkeypatch):
    pretend_triton(monkeypatch, False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU) == "torch"


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pretend_triton(monkeypatch, True)
    with use_backend("triton"), pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend(CPU)


def test_forced_triton_without_package_names_it(monkeypatch):
    pretend_triton(monkeypatch, False)
    monkeypatch.setenv("MERV_FAST_KERNELS", "triton")
    with pytest.raises(BackendError, match="'triton' package") as err:
        resolve_backend(CPU)
    assert "MERV_FAST_KERNELS" in str(err.value)


def test_forced_torch_always_torch(monkeypatch):
    pretend_triton(monkeypatch, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("torch"):
        assert resolve_backend(CPU) == "torch"


def test_real_triton_probe_reports_a_reason():
    ok, reason = dispatch.triton_available()
    assert isinstance(ok, bool) and reason


@pytest.mark.gpu
def test_auto_on_cuda_is_triton_when_it_imports():
    if not dispatch.triton_available()[0]:
        pytest.skip(dispatch.triton_available()[1])
    assert resolve_backend(torch.zeros(2, device="cuda")) == "triton"
