"""merv_fast.kernels: one op per file (Triton kernel, launcher, autograd wrapper, torch reference) plus the switch
that picks between the Triton and torch paths (`dispatch`).

This directory is installed as `merv_fast.kernels` and imports nothing from the rest of merv_fast, so the kernels
can be tested and benchmarked on their own.
"""

# With the repo root on sys.path (`python -m ...` from a checkout) this folder is also visible as a top-level
# `kernels`, the name of Hugging Face's kernel-hub package, which transformers probes at import time. Importing
# it under that name must not fail (transformers would crash) and must not look like that package (no version),
# and it must not build a second copy of the dispatch state: so under any other name it defines nothing.
if __name__ == "merv_fast.kernels":
    from .dispatch import (
        BACKENDS,
        BackendError,
        requested_backend,
        resolve_backend,
        set_backend,
        triton_available,
        use_backend,
    )

    __all__ = ["BACKENDS", "BackendError", "requested_backend", "resolve_backend", "set_backend",
               "triton_available", "use_backend"]
