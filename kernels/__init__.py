"""merv_fast.kernels: one op per file (Triton kernel, launcher, autograd wrapper, torch reference) plus the switch
that picks between the Triton and torch paths (`dispatch`).

This directory is installed as `merv_fast.kernels` and imports nothing from the rest of merv_fast, so the kernels
can be tested and benchmarked on their own.
"""

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
else:
    # Imported under any other name, this folder is the checkout's root on sys.path (`python -m ...`, torchrun,
    # pytest, a PYTHONPATH) shadowing whatever `kernels` the environment really has: Hugging Face's kernel-hub
    # distribution, which transformers imports. So the folder makes itself transparent: it loads what `import
    # kernels` would give without the checkout on sys.path, and puts that in sys.modules (the import system returns
    # sys.modules[name] after running this file), or fails exactly as that import would. It never defines anything
    # of its own under that name, so there is one backend setting, merv_fast.kernels's.
    def _load_what_this_folder_shadows(name: str):
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def elsewhere(entry: str) -> bool:
            return os.path.abspath(entry or os.getcwd()) != checkout

        search = [entry for entry in sys.path if isinstance(entry, str) and elsewhere(entry)]
        spec = None
        for finder in sys.meta_path:  # the same finders `import` asks, the checkout's root left out of their path
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(name, search)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
                if spec is not None and spec.origin and not elsewhere(os.path.dirname(os.path.dirname(spec.origin))):
                    spec = None
            if spec is not None:
                break
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {name!r} (the checkout's kernels/ folder is merv_fast.kernels, not {name!r})",
                name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _load_what_this_folder_shadows(__name__)
