"""Which implementation an op runs: its Triton kernel or its torch reference.

The requested backend is one of `auto | triton | torch`, taken from the first of these that is set:
  1. `use_backend(name)`: a context manager, for a test or a benchmark that must pin one path;
  2. the environment variable MERV_FAST_KERNELS, read at call time;
  3. `set_backend(name)`: the configured default (the model config's `kernels` field), "auto" until set.

`resolve_backend(*tensors)` turns the request into what runs for these tensors:
  auto   -> triton for CUDA tensors when triton imports; torch for CPU tensors, unless TRITON_INTERPRET=1 is set
            (then Triton's interpreter runs the kernels on CPU, which is how CPU-only CI tests them);
  triton -> triton, or a BackendError saying why it cannot run (no triton package, CPU tensors without the
            interpreter);
  torch  -> torch.

Within Triton, a kernel may have a variant for newer GPUs (TMA loads on sm_90). `target_arch(tensor)` says which
generation a launch is built for: the CUDA device's compute capability (90 for H100), or the one pinned by
`use_target(arch)` (the AOT check records each target's launches this way; tests run a variant in the
interpreter); None for CPU tensors. `tma_compatible(tensor)` says whether a TMA descriptor may address a tensor;
`MERV_FAST_TMA=0` turns TMA off everywhere (`tma_allowed`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MERV_FAST_KERNELS"

_configured = "auto"
# A ContextVar rather than a global so that a `use_backend` in one thread (a data loader, say) stays in that thread.
_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("merv_fast_kernels_pinned", default=None)


class BackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says why and what to do."""


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: kernel backend {name!r} is not one of {list(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the configured default backend (below `use_backend` and MERV_FAST_KERNELS in precedence)."""
    global _configured
    _configured = _checked(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Pin the backend inside the block, over MERV_FAST_KERNELS and the configured default."""
    token = _pinned.set(_checked(name, "use_backend"))
    try:
        yield
    finally:
        _pinned.reset(token)


def requested_backend() -> tuple[str, str]:
    """(backend, where the request came from): the request before looking at any tensor."""
    pinned = _pinned.get()
    if pinned is not None:
        return pinned, "use_backend()"
    from_env = os.environ.get(ENV_VAR, "").strip().lower()
    if from_env:
        return _checked(from_env, ENV_VAR), ENV_VAR
    return _configured, "the configured default"


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(True, "triton 3.6.0") when triton imports, else (False, why). Checked once per process."""
    try:
        import triton
    except Exception as err:  # a triton built for another torch/CUDA can fail with more than ImportError
        return False, f"the 'triton' package cannot be imported ({type(err).__name__}: {err})"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """Triton's own switch: with TRITON_INTERPRET=1 its kernels run in a NumPy interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def interpreter_compat() -> str | None:
    """Make this triton's interpreter work with this numpy, once per process; returns what was done, or None.

    triton 3.6's interpreter gives its scalar tensors `__index__ = int(data)` on a 1-element 1-D array, which numpy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every `range()` over a runtime
    integer fails. Newer triton squeezes the array first; this applies that same fix to the older interpreter, and
    says so (a warning), only where both conditions hold.
    """
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1))
        return None  # this numpy still converts size-1 arrays
    except TypeError:
        pass
    patch_tensor = interpreter._patch_lang_tensor
    if "int(self.handle.data))" not in inspect.getsource(patch_tensor):
        return None  # this triton's interpreter squeezes already

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    import triton

    done = (f"triton {triton.__version__}'s interpreter converts 1-element arrays with int(), which numpy "
            f"{np.__version__} refuses; applied newer triton's fix (squeeze first) for this process")
    warnings.warn(done, stacklevel=2)
    return done


def resolve_backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on these tensors (see the module docstring). No tensors counts as CPU."""
    name, source = requested_backend()
    if name == "torch":
        return "torch"
    real = [t for t in tensors if isinstance(t, torch.Tensor)]  # callers may pass optional tensors as None
    on_cuda = bool(real) and all(t.is_cuda for t in real)
    have_triton, triton_why = triton_available()
    if name == "auto":
        return "triton" if have_triton and (on_cuda or interpreter_enabled()) else "torch"
    if not have_triton:
        raise BackendError(f"kernel backend 'triton' was requested ({source}) but {triton_why}; "
                           f"install triton or request the 'torch' backend")
    if not on_cuda and not interpreter_enabled():
        raise BackendError(f"kernel backend 'triton' was requested ({source}) for CPU tensors; Triton kernels run "
                           f"on CUDA tensors, or on CPU with TRITON_INTERPRET=1 (Triton's interpreter)")
    return "triton"


# The pinned target, like `_pinned` a ContextVar: a recording in one thread does not change another thread's launches.
_pinned_target: contextvars.ContextVar[int | None] = contextvars.ContextVar("merv_fast_kernels_target", default=None)


@contextlib.contextmanager
def use_target(arch: int) -> Iterator[None]:
    """Build launches inside the block as for sm_<arch> (90: H100), whatever the device."""
    token = _pinned_target.set(int(arch))
    try:
        yield
    finally:
        _pinned_target.reset(token)


def target_arch(tensor: torch.Tensor) -> int | None:
    """The GPU generation a launch on this tensor is built for: the pinned one, else its CUDA device's compute
    capability as major * 10 + minor; None for a CPU tensor (the interpreter: the portable variant)."""
    pinned = _pinned_target.get()
    if pinned is not None:
        return pinned
    if not tensor.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return major * 10 + minor


# The Tensor Memory Accelerator (sm_90 and newer) copies tiles described by a descriptor whose base address and
# strides (all but the innermost, which must be 1) are multiples of 16 bytes.
TMA_MIN_ARCH = 90
TMA_ALIGNMENT = 16


def tma_allowed() -> bool:
    """`MERV_FAST_TMA=0` keeps every kernel on its pointer variant, on any GPU: a way around a TMA problem on a
    driver or triton version that the tests have not met, without leaving the Triton kernels altogether."""
    value = os.environ.get("MERV_FAST_TMA", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise BackendError(f"MERV_FAST_TMA={value!r}: use 1 (TMA on sm_90 and newer, the default) or 0 (never)")
    return value not in ("0", "false", "off")


def tma_compatible(tensor: torch.Tensor) -> bool:
    """A TMA descriptor may address this tensor: 16-byte aligned base, innermost stride 1, other strides multiples
    of 16 bytes (an odd channel count in half precision, or a column slice of a wider buffer, is not)."""
    size = tensor.element_size()
    return (tensor.data_ptr() % TMA_ALIGNMENT == 0 and tensor.stride(-1) == 1
            and all(stride * size % TMA_ALIGNMENT == 0 for stride in tensor.stride()[:-1]))
