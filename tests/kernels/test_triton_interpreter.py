"""Runs tests/kernels/triton in its own process with TRITON_INTERPRET=1 (the interpreter is process-wide and slow, so
it stays out of this process) and reports each of those tests here under its own name: one test of this module per
interpreter test, passing, failing (with its own report) or skipped as it did there. On a GPU machine the Triton
tests run directly on CUDA instead (marked gpu, `merv-fast gpu-suite`).

The subprocess runs once, when the first of these tests asks for its outcome; its per-test results come back through
pytest's own JUnit XML report."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

TRITON_TESTS = Path(__file__).parent / "triton"
ROOT = Path(__file__).resolve().parents[2]
RUNS_HERE = not torch.cuda.is_available() and any(TRITON_TESTS.glob("test_*.py"))


def _interpreter_env() -> dict:
    return dict(os.environ, TRITON_INTERPRET="1")


def _pytest(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=_interpreter_env(), capture_output=True, text=True, timeout=timeout)


def _collected() -> list[str]:
    """The interpreter tests' node ids, as the subprocess collects them (its conftest decides skips, not this one)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return []
    done = _pytest("--collect-only", "-q", str(TRITON_TESTS.relative_to(ROOT)), timeout=300)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not ids:
        raise RuntimeError(f"collecting the interpreter tests failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return ids


def pytest_generate_tests(metafunc):
    if "interpreter_test" in metafunc.fixturenames:
        ids = _collected() if RUNS_HERE else []
        metafunc.parametrize("interpreter_test", ids or [None], ids=ids or ["none"])


def _junit_key(node_id: str) -> tuple[str, str]:
    path, _, name = node_id.partition("::")
    return path.removesuffix(".py").replace("/", "."), name.replace("::", ".")


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    """{(classname, name): (outcome, text)} from one subprocess run of every interpreter test, and its output."""
    report = tmp_path_factory.mktemp("interpreter") / "junit.xml"
    done = _pytest("-q", f"--junitxml={report}", "-o", "junit_family=xunit1", str(TRITON_TESTS.relative_to(ROOT)),
                   timeout=1500)
    outcomes = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    text = (child.get("message") or "") + "\n" + (child.text or "")
            outcomes[(case.get("classname"), case.get("name"))] = (outcome, text)
    return outcomes, done.stdout[-3000:] + done.stderr[-2000:]


def test_in_the_interpreter(interpreter_test, interpreter_run):
    if interpreter_test is None:
        pytest.skip("on a GPU the Triton tests run on CUDA, marked gpu (merv-fast gpu-suite); or no triton here")
    outcomes, output = interpreter_run
    key = _junit_key(interpreter_test)
    if key not in outcomes:
        pytest.fail(f"{interpreter_test} has no result from the interpreter run (did it crash?):\n{output}")
    outcome, text = outcomes[key]
    if outcome == "skipped":
        pytest.skip(text.strip().splitlines()[0] if text.strip() else "skipped in the interpreter run")
    assert outcome == "passed", f"{interpreter_test} {outcome} in the interpreter:\n{text[-6000:]}"
