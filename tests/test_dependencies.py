"""The dependency report that names what changed when a new release of a dependency breaks the project."""

import subprocess
import sys
from pathlib import Path

from merv_fast import dependencies

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_are_listed_with_their_installed_versions():
    versions = dependencies.requirement_versions()
    assert list(versions)[:2] == ["torch", "transformers"]
    import torch
    import transformers

    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__


def test_diff_names_new_gone_and_changed_distributions(tmp_path):
    freeze = tmp_path / "known-good.txt"
    freeze.write_text("# a comment\nTransformers==5.24.0\nold_pkg==1.0\nnumpy==2.2.0\n-e git+https://x#egg=y\n"
                      "merv-fast==0.0.1\npip==1.0\n")
    known = dependencies.read_freeze(freeze)
    assert known == {"transformers": "5.24.0", "old-pkg": "1.0", "numpy": "2.2.0", "merv-fast": "0.0.1", "pip": "1.0"}
    now = {"transformers": "5.25.0", "kernels": "0.19.1", "numpy": "2.2.0", "merv-fast": "0.1.0", "pip": "26.0"}
    assert dependencies.diff(known, now) == ["+ kernels 0.19.1 (new since the known-good set)",
                                             "- old-pkg 1.0 (no longer installed)", "~ transformers 5.24.0 -> 5.25.0"]


def test_the_module_runs_without_importing_torch(tmp_path):
    freeze = tmp_path / "known-good.txt"
    freeze.write_text("transformers==0.0.1\n")
    code = ("import sys, runpy; sys.argv = ['x', '--diff', sys.argv[1]]\n"
            "try:\n    runpy.run_module('merv_fast.dependencies', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'the report imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code, str(freeze)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "merv-fast requirements: torch " in done.stdout and "~ transformers 0.0.1 -> " in done.stdout


def test_env_starts_with_the_requirements(capsys):
    from merv_fast.cli import main

    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("requirements") and "transformers" in lines[1]


def test_a_python_without_the_test_requirements_is_told_what_to_install():
    have = dependencies.installed()
    assert dependencies.test_setup_problem(have) is None  # the Python running this test has them all
    lacking = {name: v for name, v in have.items() if name not in ("torch", "matplotlib", "decord", "kernels")}
    problem = dependencies.test_setup_problem(lacking)
    assert "lacks: torch, matplotlib." in problem  # an extra's package (decord, kernels) is not required
    # the install line it gives is the README's quick start, character for character
    install = 'pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test,video]"'
    assert f"`{install}`" in problem and install in (ROOT / "README.md").read_text()


def test_the_test_setup_check_runs_in_a_python_with_nothing_installed():
    """The root conftest.py loads merv_fast/dependencies.py by path and runs its check before any other conftest:
    here in a Python without site-packages (`-S`: no torch, no pytest, no merv_fast), from outside the checkout."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('check', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
            "print(module.test_setup_problem())\n")
    done = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "merv_fast" / "dependencies.py")],
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "lacks: merv-fast, torch, transformers." in done.stdout, done.stdout
