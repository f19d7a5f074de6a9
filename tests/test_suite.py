"""The GPU suite runner, run on CPU (--allow-cpu) with tiny areas of its own: file layout, resume, retry of a
failed area, and the hard budget that kills a hung one."""

import json
import sys
import time

import pytest
import torch

from merv_fast.measure import suite

# The areas live in a module the subprocesses import (--module): an area registered only in this process would be
# unknown to the subprocess that runs it.
TEST_AREAS = '''
import os
import time
from pathlib import Path

from merv_fast.measure.results import row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure

CALLS = Path(os.environ["SUITE_TEST_DIR"])


def count_call(name):
    calls = CALLS / f"{name}.calls"
    calls.write_text((calls.read_text() if calls.exists() else "") + "x")
    return len(calls.read_text())


def tiny(results, ceilings):
    count_call("tiny")
    t = measure(lambda: sum(range(1000)), warmup=1, iters=5)
    results.append(row("kernels", "tiny sum", {"n": 1000}, t, t, flops=1000, ceilings=ceilings))


def flaky(results, ceilings):
    if count_call("flaky") == 1:
        raise RuntimeError("flaky fails the first time")
    results.append(row("kernels", "flaky", {}, measure(lambda: None, iters=3)))


def sleepy(results, ceilings):
    count_call("sleepy")
    time.sleep(120)


register_area("tiny", tiny, budget_s=60)
register_area("flaky", flaky, budget_s=60)
register_area("sleepy", sleepy, budget_s=3)
register_area("slow", sleepy, budget_s=60)
register_area("after-slow", tiny, budget_s=60)
'''


@pytest.fixture
def test_areas(tmp_path, monkeypatch):
    (tmp_path / "suite_test_areas.py").write_text(TEST_AREAS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("SUITE_TEST_DIR", str(tmp_path))
    # Import every area module first: restoring a snapshot taken before would unregister areas that modules imported
    # during this test added, and a cached module never registers them again.
    registered = suite.registered_areas()
    sys.modules.pop("suite_test_areas", None)  # each test imports its own copy (and so registers its areas)
    yield tmp_path
    sys.modules.pop("suite_test_areas", None)
    suite._areas[:] = registered


def calls(tmp_path, name):
    path = tmp_path / f"{name}.calls"
    return len(path.read_text()) if path.exists() else 0


def test_suite_runs_resumes_retries_and_kills(test_areas, capsys):
    out = test_areas / "results"
    only = ["env", "tiny", "flaky", "sleepy"]
    start = time.perf_counter()
    statuses = suite.run_suite(out, only=only, allow_cpu=True, modules=["suite_test_areas"])
    assert statuses == {"env": "done", "ceilings": "done", "tiny": "done", "flaky": "failed", "sleepy": "timeout"}
    assert time.perf_counter() - start < 60  # sleepy's 120 s sleep was cut at its 3 s budget

    [results] = out.glob("*_gpu-suite.json")
    assert results.name.endswith(f"_{suite.device_slug()}_gpu-suite.json")
    assert results.with_suffix(".md").exists()
    data = json.loads(results.read_text())
    assert list(data)[:6] == ["device", "date", "command", "versions", "ceilings", "results"]
    assert set(data["ceilings"]) == {"fp32_matmul_gflops", "copy_gb_s"}
    assert "packages" in data["environment"]
    [tiny_row] = data["results"]
    assert tiny_row["name"] == "tiny sum" and tiny_row["speedup"] == 1.0 and "share_of_ceiling" in tiny_row
    state = json.loads(results.with_suffix(".state.json").read_text())["areas"]
    assert state["flaky"]["status"] == "failed" and "flaky fails the first time" in state["flaky"]["output_tail"]
    assert state["sleepy"]["status"] == "timeout"
    printed = capsys.readouterr().out
    assert "tiny" in printed and "killed at 3 s (its budget: 3 s)" in printed

    # Second run, through the CLI entry: finished areas are skipped, the failed and timed-out ones run again.
    code = suite.main(["--allow-cpu", "--out", str(out), "--only", *only, "--module", "suite_test_areas"])
    assert code == 1  # sleepy still times out
    assert (calls(test_areas, "tiny"), calls(test_areas, "flaky"), calls(test_areas, "sleepy")) == (1, 2, 2)
    assert list(out.glob("*_gpu-suite.json")) == [results]  # the same file, resumed
    state = json.loads(results.with_suffix(".state.json").read_text())["areas"]
    assert state["flaky"] == {**state["flaky"], "status": "done", "attempts": 2}
    assert [r["name"] for r in json.loads(results.read_text())["results"]] == ["tiny sum", "flaky"]
    assert "skipped" in capsys.readouterr().out


def test_register_area_order_and_budget():
    registered = suite.registered_areas()
    try:
        suite.register_area("after-env", lambda results, ceilings: None, after="env")
        names = [a.name for a in suite._areas]
        assert names[names.index("env") + 1] == "after-env"
        with pytest.raises(ValueError, match="budget_s"):
            suite.register_area("too-long", lambda results, ceilings: None, budget_s=301)
    finally:
        suite._areas[:] = registered


def test_unknown_area_is_refused(tmp_path):
    with pytest.raises(suite.SuiteError, match="unknown area"):
        suite.run_suite(tmp_path, only=["nope"], allow_cpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_cpu_without_allow_cpu(tmp_path, capsys):
    assert suite.main(["--out", str(tmp_path)]) == 2
    assert "--allow-cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_time_limit_kills_the_running_area_and_leaves_the_rest_for_later(test_areas, monkeypatch, capsys):
    monkeypatch.setattr(suite, "MIN_AREA_S", 1.0)
    out = test_areas / "results"
    start = time.perf_counter()
    statuses = suite.run_suite(out, only=["slow", "after-slow"], allow_cpu=True, modules=["suite_test_areas"],
                               time_limit_s=6)
    assert time.perf_counter() - start < 30  # slow's 120 s sleep (60 s budget) was cut by the run's 6 s limit
    assert statuses == {"ceilings": "done", "slow": "timeout", "after-slow": "not-run"}, statuses
    assert "not run: the run's --time-limit-s 6 is spent" in capsys.readouterr().out
    state = json.loads(next(out.glob("*.state.json")).read_text())["areas"]
    assert state["slow"]["status"] == "timeout" and "after-slow" not in state  # resumable: both run next time


def test_headline_areas_come_first_and_fit_seven_minutes():
    """On a fresh GPU, `gpu-suite --time-limit-s 420`: env, ceilings, the kernel smoke test, the headline training
    step, the visual path, then the rest; their H100 estimates fit the 420 s with room for the smoke test's bound."""
    areas = suite.registered_areas()
    names = [a.name for a in areas]
    assert names[:5] == ["env", "ceilings", "kernel-smoke", "train", "visual"], names
    assert set(names[5:]) >= {"gpu-tests", "encoders", "llm", "trainer-1b"}
    by_name = {a.name: a for a in areas}
    assert by_name["kernel-smoke"].expected_s <= 90
    assert suite.head_estimate_s(areas, "visual") <= 420
    assert suite.head_estimate_s(areas, "visual") == sum(by_name[n].expected_s for n in names[:5])


def test_kernel_smoke_runs_in_order_on_cpu_within_the_time_limit(tmp_path):
    """The real areas, on CPU (the smoke test's kernels in Triton's interpreter, at tiny shapes): run in the suite's
    order, each area's seconds recorded, their sum within the run's wall time and limit; one row per check."""
    pytest.importorskip("triton")
    start = time.perf_counter()
    statuses = suite.run_suite(tmp_path, only=["env", "kernel-smoke"], allow_cpu=True, time_limit_s=420)
    elapsed = time.perf_counter() - start
    assert list(statuses) == ["env", "ceilings", "kernel-smoke"] and set(statuses.values()) == {"done"}, statuses
    [results] = tmp_path.glob("*_gpu-suite.json")
    state = json.loads(results.with_suffix(".state.json").read_text())["areas"]
    assert list(state) == ["env", "ceilings", "kernel-smoke"]
    # each area's seconds are stored rounded to 0.1 s: the sum may exceed the wall time by 0.05 s per area, no more
    assert sum(a["seconds"] for a in state.values()) <= min(elapsed, 420) + 0.05 * len(state)
    rows = {r["name"]: r["tests"] for r in json.loads(results.read_text())["results"]}
    for name in ("preprocess", "pool_concat forward", "pool_concat backward", "project_fuse forward+backward",
                 "rms_norm forward+backward", "swiglu forward+backward", "rope forward+backward",
                 "encoders streams vs sequential", "encoders graph vs sequential"):
        assert rows[name]["ok"] and rows[name]["max_rel_err"] <= rows[name]["bound"], (name, rows.get(name))
