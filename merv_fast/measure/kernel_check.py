"""`merv-fast kernels check`: every Triton kernel compiled ahead of time for the GPUs it runs on, on any machine.

    merv-fast kernels check [--targets 90,80] [--json] [--workers N] [--no-cache]
    merv-fast kernels table [--write README.md] [--check]

For each preset in PRESETS, each dtype in DTYPES and each target, each kernel module's `aot_launches` records the
launches the model makes at those shapes on that target (kernels/aot.py: sm_90 may take a TMA variant), with every
config its autotuner may pick; every distinct compilation
(the JIT's own specialization of the arguments decides what is distinct) is built for each target with the ptxas in
the triton wheel. One row per (kernel, config, target): the most registers and spill bytes over its compilations,
shared memory, the tensor-core instruction, TMA. The check fails on a compile error, a spill, shared memory over the
target's limit, a block whose registers overflow the register file, and a Triton kernel in kernels/ that no
`aot_launches` launches.

Compilations run in a process pool and their results are cached on disk (`$MERV_FAST_CACHE/aot`, default
~/.cache/merv_fast/aot), keyed by the triton version, kernels/aot.py and what is compiled (the kernel's source hash,
its specialized arguments, the config and the target).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

PRESETS = ("merv-7b", "merv-1b", "single-1b")  # single-1b: the headline baseline (one encoder: no mix gradient)
DTYPES = (torch.bfloat16, torch.float16)
BATCH = 2  # only batch 1 would change what the JIT compiles (integer arguments equal to 1 become constants)
TEXT_TOKENS = 128
FRAME_SIZE = (360, 640)  # a common decoded size; 360 is not a multiple of 16, the worse case for alignment
BEGIN = "<!-- kernels-table:begin -->"
END = "<!-- kernels-table:end -->"


def model_shapes(preset: str, dtype: torch.dtype):
    """The kernels' view of a preset (kernels/aot.py's ModelShapes)."""
    from merv_fast.config import get_preset
    from merv_fast.data.preprocess import encoder_input_spec
    from merv_fast.kernels.aot import EncoderShape, ModelShapes

    cfg = get_preset(preset)
    return ModelShapes(
        name=preset, dtype=dtype, batch=BATCH,
        encoders=tuple(EncoderShape(e.time_steps, tuple(e.grid), e.hidden_size) for e in cfg.encoders),
        pool_size=tuple(cfg.visual.pool_size), llm_hidden=cfg.llm.hidden_size,
        llm_intermediate=cfg.llm.intermediate_size, llm_heads=cfg.llm.num_heads, llm_kv_heads=cfg.llm.num_kv_heads,
        sequence=cfg.num_visual_tokens + TEXT_TOKENS,
        input_specs=tuple(encoder_input_spec(e, cfg.frames_sampled, dtype) for e in cfg.encoders),
        frames_sampled=cfg.frames_sampled, frame_size=FRAME_SIZE)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@functools.lru_cache(maxsize=None)
def _launches(preset: str, dtype_name: str, module: str, target: int):
    from merv_fast.kernels import aot

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    return aot.record_module(importlib.import_module(f"merv_fast.kernels.{module}"), model_shapes(preset, dtype),
                             target)


@dataclasses.dataclass(frozen=True)
class Locator:
    """Where a compilation comes from: the n-th launch of a module's spec at a preset and dtype on a target, one
    config."""

    preset: str
    dtype: str
    module: str
    target: int
    launch: int
    config: int


@dataclasses.dataclass
class Compilation:
    kernel: str
    config: str
    target: int
    key: str
    where: Locator
    cases: set[str] = dataclasses.field(default_factory=set)  # "merv-7b bf16", ...


def kernels_dir() -> Path:
    import merv_fast.kernels

    return Path(merv_fast.kernels.__file__).resolve().parent


def salt() -> str:
    """What every cached result depends on besides its compile key (which holds the kernel's own source hash): the
    triton version and the AOT code that compiles and reads the binaries."""
    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    digest.update((kernels_dir() / "aot.py").read_bytes())
    return digest.hexdigest()


def plan(targets: tuple[int, ...], only: str | None = None) -> tuple[list[Compilation], list[str]]:
    """(the distinct compilations, the kernels in kernels/ that no launch spec launches); `only`: the kernels whose
    name contains it."""
    from merv_fast.kernels import aot

    found = {name: file for name, file in aot.discover_kernels(kernels_dir()).items() if not only or only in name}
    modules = sorted({name.split(".")[0] for name in found})
    compilations: dict[str, Compilation] = {}
    launched = set()
    for preset in PRESETS:
        for dtype in DTYPES:
            for module in modules:
                for target in targets:
                    for n, launch in enumerate(_launches(preset, _dtype_name(dtype), module, target)):
                        if launch.kernel not in found:
                            continue
                        launched.add(launch.kernel)
                        for c, config in enumerate(launch.configs):
                            key = aot.compile_key(launch.fn, launch.args, {**launch.kwargs, **config}, target)
                            entry = compilations.setdefault(key, Compilation(
                                launch.kernel, aot.config_label(config), target, key,
                                Locator(preset, _dtype_name(dtype), module, target, n, c)))
                            entry.cases.add(f"{preset} {_dtype_name(dtype)}")
    return list(compilations.values()), sorted(set(found) - launched)


def _worker_init() -> None:
    # The GPU path's launches, whatever the parent's environment says (the interpreter launches other blocks).
    os.environ.pop("TRITON_INTERPRET", None)
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _compile(where: Locator, target: int) -> dict:
    """In a worker: rebuild the launch (recording is cheap and deterministic) and compile it."""
    from merv_fast.kernels import aot

    launch = _launches(where.preset, where.dtype, where.module, where.target)[where.launch]
    start = time.perf_counter()
    try:
        info = aot.compile_launch(launch.fn, launch.args, {**launch.kwargs, **launch.configs[where.config]}, target)
    except Exception as err:  # a compile error is a finding of the check, reported in its row
        first = (str(err).strip().splitlines() or [""])[0]
        return {"error": f"{type(err).__name__}: {first}"[:300], "seconds": round(time.perf_counter() - start, 2)}
    return {**dataclasses.asdict(info), "seconds": round(time.perf_counter() - start, 2)}


def default_cache_dir() -> Path:
    base = os.environ.get("MERV_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merv_fast")
    return Path(base) / "aot"


def compile_all(compilations: list[Compilation], workers: int, cache_dir: Path | None) -> tuple[list[dict], int]:
    """(each compilation's result: CompiledInfo's fields or {"error": ...}, how many were compiled, not cached)."""
    prefix = salt()
    keys = [hashlib.sha256(f"{prefix}\n{c.key}".encode()).hexdigest() for c in compilations]
    results: list[dict | None] = [None] * len(compilations)
    if cache_dir is not None:
        for i, key in enumerate(keys):
            path = cache_dir / f"{key}.json"
            if path.exists():
                results[i] = json.loads(path.read_text())
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        context = multiprocessing.get_context("spawn")  # no inherited interpreter state, torch or triton caches
        with concurrent.futures.ProcessPoolExecutor(max(1, min(workers, len(todo))), mp_context=context,
                                                    initializer=_worker_init) as pool:
            futures = {pool.submit(_compile, compilations[i].where, compilations[i].target): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if cache_dir is not None and "error" not in results[i]:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = cache_dir / f"{keys[i]}.{os.getpid()}.tmp"
                    tmp.write_text(json.dumps(results[i]))
                    tmp.replace(cache_dir / f"{keys[i]}.json")
    return results, len(todo)


def rows(compilations: list[Compilation], results: list[dict], unlaunched: list[str]) -> list[dict]:
    """One row per (kernel, config, target), worst case over its compilations, in kernel order."""
    from merv_fast.kernels.aot import CompiledInfo, limit_problems

    grouped: dict[tuple, dict] = {}
    for comp, result in zip(compilations, results):
        row = grouped.setdefault((comp.kernel, comp.config, comp.target), {
            "kernel": comp.kernel, "config": comp.config, "target": f"sm_{comp.target}", "compilations": 0,
            "registers": 0, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "tensor_core": "",
            "tma": False, "cases": set(), "problems": []})
        row["compilations"] += 1
        row["cases"] |= comp.cases
        if "error" in result:
            row["problems"].append(f"compile error: {result['error']}")
            continue
        for field in ("registers", "spill_stores", "spill_loads", "shared_bytes"):
            row[field] = max(row[field], result[field])
        row["num_warps"] = result["num_warps"]  # a config's, the same in all its compilations
        row["tensor_core"] = row["tensor_core"] or result["tensor_core"]
        row["tma"] = row["tma"] or result["tma"]
    for (_, _, target), row in grouped.items():  # the limits, checked on the row's worst case
        if "num_warps" in row:
            worst = CompiledInfo(**{f.name: row[f.name] for f in dataclasses.fields(CompiledInfo)})
            row["problems"] += limit_problems(worst, target)
    out = [{**r, "cases": sorted(r["cases"])} for r in grouped.values()]
    out.sort(key=lambda r: (r["kernel"], r["config"], r["target"]))
    for name in unlaunched:
        out.append({"kernel": name, "config": "-", "target": "-", "compilations": 0, "registers": 0,
                    "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "tensor_core": "", "tma": False,
                    "cases": [], "problems": ["no launch spec: its module's aot_launches(model) never launches it"]})
    return out


def run_check(targets: tuple[int, ...] = (90, 80), workers: int | None = None,
              cache_dir: Path | None = None, only: str | None = None) -> dict:
    """{"triton": version, "targets", "rows", "seconds", "compiled"}; cache_dir None disables the cache."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("merv-fast kernels check compiles the GPU path: unset TRITON_INTERPRET")
    start = time.perf_counter()
    compilations, unlaunched = plan(targets, only)
    results, compiled = compile_all(compilations, workers or len(os.sched_getaffinity(0)), cache_dir)
    return {"triton": triton.__version__, "targets": [f"sm_{t}" for t in targets],
            "presets": list(PRESETS), "dtypes": [_dtype_name(d) for d in DTYPES],
            "rows": rows(compilations, results, unlaunched),
            "compilations": len(compilations), "compiled_now": compiled,
            "seconds": round(time.perf_counter() - start, 1)}


def table_markdown(report: dict) -> str:
    """The rows as a markdown table, with what they were compiled from."""
    lines = [f"Triton {report['triton']}, compiled ahead of time for {', '.join(report['targets'])} at the "
             f"launches of {', '.join(report['presets'])} in {' and '.join(report['dtypes'])} (every autotune "
             f"config); registers and spills are the worst over a row's compilations. Generated by "
             f"`merv-fast kernels table --write README.md`; do not edit by hand.", "",
             "| kernel | config | target | registers | spills (B stored / loaded) | shared memory (KiB) | "
             "tensor cores | TMA | check |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        spills = f"{r['spill_stores']} / {r['spill_loads']}" if r["spill_stores"] or r["spill_loads"] else "0"
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | {r['registers']} | {spills} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['tensor_core'] or 'no (FMA)'} | "
                     f"{'yes' if r['tma'] else 'no'} | {status} |")
    return "\n".join(lines) + "\n"


def failures(report: dict) -> list[dict]:
    return [r for r in report["rows"] if r["problems"]]


def splice(text: str, table: str) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no `{BEGIN}` ... `{END}` markers in the file")
    return text[:begin + len(BEGIN)] + "\n" + table + text[end:]


def readme_block(text: str) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no `{BEGIN}` ... `{END}` markers in the file")
    return text[begin + len(BEGIN) + 1:end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merv-fast kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, text in (("check", "compile every kernel for each target; one row per (kernel, config, target)"),
                       ("table", "the README's kernels table from a check run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
        p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
        p.add_argument("--no-cache", action="store_true", help="compile everything again")
        if name == "check":
            p.add_argument("--json", action="store_true", help="the report as JSON")
            p.add_argument("--only", default=None, metavar="TEXT", help="only the kernels whose name contains TEXT")
        else:
            p.add_argument("--write", default=None, metavar="README.md",
                           help="rewrite the table between its markers in this file (default: print it)")
            p.add_argument("--check", action="store_true", help="with --write: exit 1 if the table is stale")
    args = parser.parse_args(argv)
    try:
        targets = tuple(int(t) for t in args.targets.split(","))
    except ValueError:
        parser.error(f"--targets {args.targets!r}: give compute capabilities like 90,80")
    from merv_fast.kernels.aot import SHARED_MEMORY_LIMIT

    unknown = [t for t in targets if t not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"--targets: no limits known for {unknown}; known: {sorted(SHARED_MEMORY_LIMIT)}")
    report = run_check(targets, args.workers, None if args.no_cache else default_cache_dir(),
                       getattr(args, "only", None))
    bad = failures(report)
    if args.what == "check":
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(table_markdown(report), end="")
            print(f"{len(report['rows'])} rows, {len(bad)} failing; {report['seconds']} s", file=sys.stderr)
        return 1 if bad else 0
    table = table_markdown(report)
    if args.write is None:
        print(table, end="")
        return 0
    path = Path(args.write)
    text = path.read_text()
    new = splice(text, table)
    if args.check:
        if new != text:
            print(f"{path}: the kernels table is stale; run `merv-fast kernels table --write {path}`",
                  file=sys.stderr)
            return 1
        print(f"{path}: the kernels table is up to date")
        return 0
    if new != text:
        path.write_text(new)
    print(f"{path}: kernels table {'rewritten' if new != text else 'already up to date'}")
    return 0
