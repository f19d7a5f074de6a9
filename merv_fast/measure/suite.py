"""The GPU suite: every check and benchmark that needs the GPU machine, area by area, into ONE results file.

    merv-fast gpu-suite [--out DIR] [--no-resume] [--only AREA ...] [--allow-cpu] [--module MODULE ...]

Each area runs in its own subprocess (`python -m merv_fast.measure.suite --area NAME --results PATH`) under a hard
time budget (at most 300 s): a hung kernel or a crashed driver costs one area, not the run. Areas append rows to
the run's results file as they measure (see results.py), and the run records each area's outcome in a state file
beside it (`<results>.state.json`). Running the suite again resumes: finished areas are skipped, failed and
timed-out ones run again.

The order is the order of importance for a GPU lent for a few minutes (`--time-limit-s 420`): env and ceilings
(seconds), `kernel-smoke` (every Triton kernel in bf16 against its reference, encoder modes against sequential),
the headline `train` area (merv-1b vs single-1b), `visual` (the fused visual path vs the release's modules), then
everything else. Each area carries an estimate of its seconds on an H100 (`estimate_s`), `head_estimate_s` sums them.

Registering an area: in a module, call `register_area(name, fn, budget_s=..., after=...)` at import time, with
`fn(results: ResultsFile, ceilings: dict) -> None`, and list the module in AREA_MODULES (or pass --module). An area
registered any other way is unknown to the subprocess that has to run it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from merv_fast.measure.results import ResultsFile, _write_atomically, device_slug, results_path

MAX_BUDGET_S = 300
MIN_AREA_S = 20  # under --time-limit-s, an area is not started with less than this left
# Modules imported before the suite runs, each registering its areas on import, e.g. "merv_fast.measure.bench_visual".
# Their order is the run's: the focused measurements first, then the commands and the bench/ suites (command_areas),
# which repeat parts of them, so that a run cut short by --time-limit-s has measured what matters most.
AREA_MODULES: list[str] = ["merv_fast.measure.smoke_areas", "merv_fast.measure.gpu_areas",
                           "merv_fast.measure.encoder_areas",
                           "merv_fast.measure.data_areas", "merv_fast.measure.llm_areas",
                           "merv_fast.measure.eval_areas", "merv_fast.measure.llama_kernel_areas",
                           "merv_fast.measure.command_areas"]
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repo root in a source checkout (editable install)


class SuiteError(RuntimeError):
    """The suite cannot run as asked (no CUDA, an unknown area); the message says what to do."""


@dataclass(frozen=True)
class Area:
    name: str
    fn: Callable  # fn(results: ResultsFile, ceilings: dict) -> None
    budget_s: float = MAX_BUDGET_S
    estimate_s: float | None = None  # expected seconds on an H100, subprocess start included; None: its budget
    cpu_env: dict | None = None  # extra environment of its subprocess on a machine without CUDA

    @property
    def expected_s(self) -> float:
        return self.budget_s if self.estimate_s is None else self.estimate_s


_areas: list[Area] = []


def register_area(name: str, fn: Callable, budget_s: float = MAX_BUDGET_S, after: str | None = None, *,
                  estimate_s: float | None = None, cpu_env: dict | None = None) -> None:
    """Add an area to the suite, at the end or right after the area named `after`. Registering a name again
    replaces the earlier area, so a module imported twice does no harm."""
    if not 0 < budget_s <= MAX_BUDGET_S:
        raise ValueError(f"area {name!r}: budget_s must be in (0, {MAX_BUDGET_S}], got {budget_s}")
    _areas[:] = [a for a in _areas if a.name != name]
    position = len(_areas)
    if after is not None:
        names = [a.name for a in _areas]
        if after not in names:
            raise ValueError(f"area {name!r}: after={after!r} is not registered (have {names})")
        position = names.index(after) + 1
    _areas.insert(position, Area(name, fn, budget_s, estimate_s, cpu_env))


def registered_areas(modules: list[str] = ()) -> list[Area]:
    for module in [*AREA_MODULES, *modules]:
        importlib.import_module(module)
    return list(_areas)


# ----------------------------------------------------------------------------------------------- built-in areas
def current_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_area(results: ResultsFile, ceilings: dict) -> None:
    """Versions and which optional packages are missing, and why (merv_fast.env's report)."""
    from merv_fast.env import environment_report

    results.set_environment(environment_report())


def ceilings_area(results: ResultsFile, ceilings: dict) -> None:
    from merv_fast.measure.ceilings import measure_ceilings

    results.set_ceilings(measure_ceilings(current_device()))


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def gpu_tests_area(results: ResultsFile, ceilings: dict) -> None:
    """`pytest -m gpu tests` from the repo root, recorded as a row of counts; failures fail the area."""
    if not (SOURCE_ROOT / "tests").is_dir():
        raise RuntimeError(f"gpu-tests runs the tests of a source checkout; there is no tests/ in {SOURCE_ROOT}")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in PYTEST_COUNT.findall(summary)}
    readable = shlex.join(["python", *command[1:]])
    results.append({"area": "tests", "name": "pytest -m gpu tests", "config": {"command": readable},
                    "tests": {**counts, "exit_code": done.returncode,
                              "seconds": round(time.perf_counter() - start, 1)}})
    if done.returncode not in (0, 5):  # 5: no test collected, which is not a failure of the suite
        raise RuntimeError(f"gpu tests failed (exit {done.returncode}): {summary}")


register_area("env", env_area, budget_s=120, estimate_s=8)
register_area("ceilings", ceilings_area, budget_s=120, estimate_s=15)
register_area("gpu-tests", gpu_tests_area, budget_s=MAX_BUDGET_S, estimate_s=240)


def head_estimate_s(areas: list[Area], through: str) -> float:
    """Expected seconds of the areas up to and including `through`, in run order."""
    names = [a.name for a in areas]
    return sum(a.expected_s for a in areas[:names.index(through) + 1])


# ----------------------------------------------------------------------------------------------- the runner
def state_path(results: Path) -> Path:
    return results.with_suffix(".state.json")


def _load_state(results: Path) -> dict:
    path = state_path(results)
    return json.loads(path.read_text()) if path.exists() else {"areas": {}}


def _child_env(area: Area | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if area is not None and area.cpu_env and not torch.cuda.is_available():
        env.update(area.cpu_env)
    if (SOURCE_ROOT / "setup.py").exists():  # run from a source tree: the child must import this same merv_fast
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def _run_in_subprocess(area: Area, results: Path, modules: list[str], timeout_s: float) -> tuple[str, float, str]:
    """(status: done | failed | timeout, seconds, the end of its output)."""
    command = [sys.executable, "-m", "merv_fast.measure.suite", "--area", area.name, "--results", str(results)]
    command += [f"--module={m}" for m in modules]
    start = time.perf_counter()
    # A session of its own, so that the budget kills what the area started too (pytest, a dataloader worker).
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_child_env(area))
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        status = "done" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # SIGKILL, not a polite SIGTERM: rows are on disk as soon as they are measured, so nothing is lost, and a
        # process stuck in a CUDA call may not act on anything gentler.
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    tail = "\n".join((output or "").strip().splitlines()[-20:])
    return status, time.perf_counter() - start, tail


def _select(areas: list[Area], only: list[str] | None) -> list[Area]:
    if not only:
        return areas
    known = [a.name for a in areas]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SuiteError(f"unknown area(s) {unknown}; areas are {known}")
    # Every benchmark row is compared with the ceilings of its own run, so they come along unless done already.
    wanted = set(only) | ({"ceilings"} if "ceilings" in known else set())
    return [a for a in areas if a.name in wanted]


def _results_file_for_run(out_dir: Path, resume: bool) -> Path:
    """Resuming: the newest suite file of this device in out_dir, whatever its date. Otherwise: today's, anew."""
    if resume:
        earlier = sorted(out_dir.glob(f"*_{device_slug()}_gpu-suite.json"))
        if earlier:
            return earlier[-1]
    return results_path(out_dir, "gpu-suite")


def run_suite(out_dir: str | Path = "bench/results", resume: bool = True, only: list[str] | None = None, *,
              allow_cpu: bool = False, modules: list[str] | None = None, command: str | None = None,
              time_limit_s: float | None = None) -> dict[str, str]:
    """Run the registered areas in order, each in its own subprocess under its budget. Returns {area: status}.

    `time_limit_s` bounds the whole run (a lent GPU's minutes): an area gets at most what is left, one killed by the
    limit counts as timed out, and the areas after it are left "not-run"; a later run resumes with both."""
    if not torch.cuda.is_available() and not allow_cpu:
        raise SuiteError("no CUDA device here: the GPU suite measures a GPU. Pass --allow-cpu to run it on the "
                         f"CPU anyway (results are labelled {device_slug('cpu')})")
    modules = list(modules or [])
    selected = _select(registered_areas(modules), only)
    path = _results_file_for_run(Path(out_dir), resume)
    if resume and path.exists():
        results = ResultsFile.open(path)
        state = _load_state(path)
    else:
        command = command or shlex.join(["merv-fast", "gpu-suite", *sys.argv[1:]])
        results = ResultsFile.create(path, command=command)
        state = {"areas": {}}
    print(f"[gpu-suite] {results.data['device']} -> {path}", flush=True)

    statuses = {}
    started = time.perf_counter()
    for area in selected:
        earlier = state["areas"].get(area.name, {})
        if earlier.get("status") == "done":
            statuses[area.name] = "done"
            print(f"[gpu-suite] {area.name:<16} skipped (done in an earlier run)", flush=True)
            continue
        timeout_s = area.budget_s
        if time_limit_s is not None:
            left = time_limit_s - (time.perf_counter() - started)
            if left < MIN_AREA_S:
                statuses[area.name] = "not-run"
                print(f"[gpu-suite] {area.name:<16} not run: the run's --time-limit-s {time_limit_s:g} is spent",
                      flush=True)
                continue
            timeout_s = min(timeout_s, left)
        status, seconds, tail = _run_in_subprocess(area, path, modules, timeout_s)
        statuses[area.name] = status
        state["areas"][area.name] = {"status": status, "seconds": round(seconds, 1), "budget_s": area.budget_s,
                                     "attempts": earlier.get("attempts", 0) + 1, "finished": time.strftime("%FT%T"),
                                     "output_tail": tail if status != "done" else ""}
        _write_atomically(state_path(path), json.dumps(state, indent=2) + "\n")
        last_line = tail.splitlines()[-1] if tail else ""
        detail = {"done": "", "failed": f": {last_line}", "timeout": f": killed at {timeout_s:g} s (its budget: "
                  f"{area.budget_s:g} s)"}
        print(f"[gpu-suite] {area.name:<16} {status:<8} {seconds:6.1f} s{detail[status]}", flush=True)
    return statuses


def _run_one_area(name: str, results: str, modules: list[str]) -> int:
    """The subprocess side: run one area against the run's results file."""
    areas = {a.name: a for a in registered_areas(modules)}
    if name not in areas:
        raise SuiteError(f"unknown area {name!r}; areas are {list(areas)} (register it in a module listed in "
                         f"AREA_MODULES or passed with --module)")
    file = ResultsFile.open(results)
    areas[name].fn(file, file.ceilings)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merv-fast gpu-suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="directory of the results file (default: %(default)s)")
    parser.add_argument("--no-resume", action="store_true", help="start a new results file instead of resuming")
    parser.add_argument("--only", nargs="+", metavar="AREA", help="run only these areas (plus the ceilings)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a machine without CUDA")
    parser.add_argument("--module", action="append", default=[], help="import this module to register more areas")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop starting areas when this many seconds have passed (a later run resumes)")
    parser.add_argument("--area", help=argparse.SUPPRESS)  # subprocess side
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.area:
            return _run_one_area(args.area, args.results, args.module)
        command = shlex.join(["merv-fast", "gpu-suite", *(sys.argv[1:] if argv is None else argv)])
        statuses = run_suite(args.out, resume=not args.no_resume, only=args.only, allow_cpu=args.allow_cpu,
                             modules=args.module, command=command, time_limit_s=args.time_limit_s)
    except SuiteError as err:
        print(f"merv-fast gpu-suite: {err}", file=sys.stderr)
        return 2
    return 0 if all(s == "done" for s in statuses.values()) else 1


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module; the areas that AREA_MODULES register go
    # into merv_fast.measure.suite, so hand over to that copy.
    from merv_fast.measure import suite

    sys.exit(suite.main())
