"""The checkout's top-level kernels/ folder never shadows the `kernels` distribution (Hugging Face's kernel hub,
which transformers imports at import time). `python -m ...`, torchrun, pytest and PYTHONPATH all put the checkout's
root on sys.path, so these tests run real interpreters with the root as their working directory."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def installed_kernels_distribution() -> bool:
    try:
        from importlib.metadata import PackageNotFoundError, version
        version("kernels")
        return True
    except PackageNotFoundError:
        return False


needs_hub_kernels = pytest.mark.skipif(not installed_kernels_distribution(),
                                       reason="the `kernels` distribution is not installed (the test extra installs it)")


@needs_hub_kernels
def test_transformers_imports_the_real_kernels_from_the_checkout_root():
    code = ("import sys, kernels, transformers.activations\n"
            "assert sys.path[0] == '', sys.path[:2]\n"  # `-c` puts the working directory (the root) first
            "print(kernels.__file__)\n"
            "from kernels import CUDAProperties\n")
    done = run_from_root("-c", code)
    assert done.returncode == 0, done.stderr
    loaded_from = Path(done.stdout.strip().splitlines()[-1]).resolve()
    assert ROOT not in loaded_from.parents, f"`import kernels` loaded the checkout's folder: {loaded_from}"


@needs_hub_kernels
def test_python_m_cli_env_from_the_checkout_root():
    done = run_from_root("-m", "merv_fast.cli", "env")
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(line.startswith("transformers") for line in done.stdout.splitlines())


@needs_hub_kernels
def test_pythonpath_with_the_root_does_not_shadow(tmp_path):
    # The GPU suite and the checkpoint tests' subprocesses put the root on PYTHONPATH, from another directory.
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", "import kernels, transformers.activations; print(kernels.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ROOT not in Path(done.stdout.strip()).resolve().parents


def test_without_the_distribution_import_kernels_fails_as_if_the_folder_were_not_there():
    # -S: no site-packages, so no `kernels` anywhere but the checkout's folder; `import kernels` must then fail the
    # way it would in a directory without that folder, not hand back merv_fast's kernels under a foreign name.
    code = ("try:\n    import kernels\nexcept ModuleNotFoundError as err:\n"
            "    assert err.name == 'kernels', err.name\n    print('absent')\nelse:\n    print(kernels.__file__)\n")
    done = run_from_root("-S", "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "absent"


@needs_hub_kernels
def test_one_backend_setting_whatever_the_name():
    code = ("import kernels, merv_fast.kernels\n"
            "assert not hasattr(kernels, 'resolve_backend'), kernels.__file__\n"
            "assert merv_fast.kernels.resolve_backend is merv_fast.kernels.dispatch.resolve_backend\n")
    done = run_from_root("-c", code)
    assert done.returncode == 0, done.stderr
