"""The environment report: every optional package is accounted for, with a reason when it is not usable."""

import sys

import pytest

from merv_fast import env


@pytest.fixture(scope="module")
def report():
    return env.environment_report()


def test_report_covers_everything(report):
    assert set(report) >= {"python", "torch", "cuda", "devices", "packages", "native", "kernels"}
    assert set(report["packages"]) == {"triton", "DALI", "torchcodec", "PyAV", "flash-attn", "xformers",
                                       "transformers", "NVIDIA apex"}
    for name, info in report["packages"].items():
        assert info["usable"] or info["why"], f"{name} is unusable without a reason"
    assert report["kernels"]["auto_resolves_to"] in ("triton", "torch")


def test_format_report_has_one_line_per_item(report):
    text = env.format_report(report)
    for label in ("torch", "CUDA", "triton", "DALI", "PyAV", "NVIDIA apex", "native _C", "kernels"):
        assert any(line.startswith(label) for line in text.splitlines()), label


def test_missing_package_says_why():
    info = env.probe_package("surely_not_a_module_xyz")
    assert info == {"available": False, "usable": False, "version": None,
                    "why": "ModuleNotFoundError: No module named 'surely_not_a_module_xyz'"}


def _fake_package(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def isolated_apex(tmp_path, monkeypatch):
    """Put a fake `apex` first on sys.path, and forget any real one for the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        del sys.modules[name]


def test_pypi_apex_is_reported_as_unrelated(isolated_apex):
    _fake_package(isolated_apex, {"apex/__init__.py": "", "apex/views.py": "# a web toolkit\n"})
    info = env.probe_apex()
    assert not info["usable"] and "unrelated package named apex" in info["why"]


def test_nvidia_apex_is_recognised_by_contents(isolated_apex):
    _fake_package(isolated_apex, {"apex/__init__.py": "__version__ = '0.1'\n",
                                  "apex/amp/__init__.py": "",
                                  "apex/optimizers/__init__.py": "class FusedAdam:\n    pass\n"})
    info = env.probe_apex()
    assert info["available"] and info["version"] == "0.1"
    assert "unrelated" not in (info["why"] or "")  # unusable here only for want of amp_C or CUDA


def test_versions_header_keys():
    assert list(env.versions()) == ["merv_fast", "torch", "triton", "cuda", "driver"]
