"""GPU-suite areas that run the project's own commands the way a user runs them, and record what they report:

- `trainer-1b`, `trainer-7b`: `merv-fast train` itself (the FSDP2 trainer, not the bench's step) on the MERV preset
  and on its single-encoder baseline, same data and settings; step time, samples/s, tokens/s, MFU and peak memory from
  the runs' metrics.jsonl, warm-up steps dropped. Under torchrun over every GPU of the machine when it has more than
  one (FSDP2 + NCCL + bf16 mixed precision); one process otherwise (the trainer shards nothing there). A second
  row, `predicted vs measured`, holds `merv-fast plan`'s step time and peak memory for the same run
  (merv_fast/plan/check.py).
- `profile`: `merv-fast profile` (torch.profiler): the per-phase table of MERV vs its baseline as a row, and the
  phase-bar and encoder-timeline PNGs copied beside the results file.
- `bench-<suite>`: each pytest-benchmark suite in bench/ with timing enabled, one area per file; one row per
  benchmark (the CUDA-event median when the suite stored one, else pytest-benchmark's own median).

On a CPU (`gpu-suite --allow-cpu`, the tests) the same code runs at tiny shapes.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from merv_fast.config import BASELINE_OF
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import MAX_BUDGET_S, SOURCE_ROOT, register_area
from merv_fast.measure.timing import summarize

GPU = torch.cuda.is_available()
TRAIN_WORKERS = 4  # DataLoader workers per rank of the timed `merv-fast train` runs


def _gpu_memory_gb() -> float:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if GPU else 0.0


# ----------------------------------------------------------------------------------------------- merv-fast train
def train_command(preset: str, data: str, out: str, *, steps: int, batch: int, extra: list[str] = ()) -> list[str]:
    """The `merv-fast train` command line for one timing run: under torchrun over every GPU when there are several."""
    ranks = torch.cuda.device_count() if GPU else 1
    launcher = [sys.executable, "-m", "merv_fast.cli"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    "-m", "merv_fast.cli"]
    return [*launcher, "train", "--recipe", "merv-frozen", "--preset", preset, "--data", data, "--out", out,
            "--max-steps", str(steps), "--total-steps", "1000",
            "--set", f"global_batch_size={batch}", "--set", f"micro_batch_size={max(1, batch // ranks)}",
            "--set", f"num_workers={TRAIN_WORKERS}", "--set", "keep_last=1", *extra]


def measured_steps(metrics_path: Path, warmup: int) -> list[dict]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    kept = rows[warmup:]
    if not kept:
        raise RuntimeError(f"{metrics_path}: {len(rows)} steps logged, none after the {warmup} warm-up steps")
    return kept


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_trainer(preset: str, data: str, workdir: Path, *, steps: int, warmup: int, batch: int,
                timeout_s: float) -> list[dict]:
    out = workdir / preset
    command = train_command(preset, data, str(out), steps=steps, batch=batch)
    done = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return measured_steps(out / "metrics.jsonl", warmup)


def trainer_area(results: ResultsFile, ceilings: dict, *, gpu_preset: str, cpu_preset: str | None,
                 min_memory_gb: float = 0.0) -> None:
    """`gpu_preset` on a GPU with at least `min_memory_gb`; `cpu_preset` on a CPU (None: a full-size-only area)."""
    from merv_fast.data.synth import synthesize
    from merv_fast.plan.check import as_run, dataset_text_tokens, prediction_row, synthetic_frame_bytes

    preset = gpu_preset if GPU else cpu_preset
    if preset is None:
        print(f"trainer {gpu_preset}: measured on a GPU only")
        return
    baseline = BASELINE_OF[preset]
    if GPU and _gpu_memory_gb() < min_memory_gb:
        print(f"{preset}: skipped, a one-process AdamW step needs about {min_memory_gb:.0f} GB of GPU memory and "
              f"this GPU has {_gpu_memory_gb():.0f} GB")
        return
    steps, warmup, batch = (6, 2, 8) if GPU else (3, 1, 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        media = synthesize(work / "media", videos=4 * batch, images=0, texts=0, seed=0)  # video batches only
        # Each command gets half of what is left of the area's budget (the baseline runs first).
        per_run = MAX_BUDGET_S * 0.45
        base = run_trainer(baseline, media["json"], work, steps=steps, warmup=warmup, batch=batch, timeout_s=per_run)
        merv = run_trainer(preset, media["json"], work, steps=steps, warmup=warmup, batch=batch, timeout_s=per_run)
        model_cfg = as_run(preset)
        text_mean, text_max = dataset_text_tokens(media["json"], media["media_root"], model_cfg)
    ranks = torch.cuda.device_count() if GPU else 1
    config = {"command": "merv-fast train --recipe merv-frozen", "preset": preset, "baseline": baseline,
              "global_batch": batch, "ranks": ranks, "fsdp2": ranks > 1, "steps_measured": len(merv),
              "warmup_steps": warmup, "data": f"{4 * batch} synthetic video clips (video batches only)",
              "activation_checkpointing": "full", "peak_mem_bytes": {"merv": max(r["peak_mem_bytes"] for r in merv),
                                                                     "baseline": max(r["peak_mem_bytes"] for r in base)},
              "phases_s": {side: {k: round(statistics.median(r["phases"].get(k, 0.0) for r in rows), 5)
                                  for k in rows[0]["phases"]} for side, rows in (("merv", merv), ("baseline", base))}}
    results.append(row("train", f"merv-fast train {preset} vs {baseline}", config,
                       summarize([r["step_time_s"] * 1e3 for r in merv]),
                       summarize([r["step_time_s"] * 1e3 for r in base]),
                       reference_name=f"{baseline} (merv-fast train, same data and settings)",
                       samples_per_s=_median(merv, "samples_per_s"), tokens_per_s=_median(merv, "tokens_per_s"),
                       mfu=_median(merv, "mfu")))
    # `merv-fast plan`'s prediction of the same run (the trainer's prefetcher holds the next micro-batch too)
    predicted = prediction_row(
        f"merv-fast train {preset}", model_cfg, ranks=ranks, global_batch=batch, micro_batch=max(1, batch // ranks),
        text_tokens=text_mean, max_text_tokens=text_max, checkpointing="full",
        frame_bytes=synthetic_frame_bytes(model_cfg.frames_sampled), prefetch=True, ceilings=ceilings,
        step_times_s=[r["step_time_s"] for r in merv],
        peak_bytes=config["peak_mem_bytes"]["merv"] if GPU else None, num_workers=TRAIN_WORKERS)
    if predicted is not None:
        results.append(predicted)


# ----------------------------------------------------------------------------------------------- merv-fast profile
def profile_area(results: ResultsFile, ceilings: dict) -> None:
    from merv_fast.measure.profile import ProfileSettings, run_profile

    with tempfile.TemporaryDirectory() as tmp:
        report = run_profile(ProfileSettings(steps=3 if GPU else 2, warmup=2 if GPU else 1, out=tmp))
        stem = results.path.stem
        plots = []
        for plot in report["plots"]:  # beside the results file, named after it: committed with it
            target = results.path.parent / f"{stem}_{Path(plot).name}"
            shutil.copyfile(plot, target)
            plots.append(target.name)
    merv, base = report["merv"], report["baseline"]
    config = {"command": "merv-fast profile", "preset": report["merv"]["preset"],
              "baseline": report["baseline"]["preset"], "batch_size": report["batch_size"],
              "text_tokens": report["text_tokens"], "timing_source": merv["source"], "plots": plots,
              "phases_ms_per_step": {side: {p["phase"]: round(p["ms_per_step"], 3) for p in r["phases"]}
                                     for side, r in (("merv", merv), ("baseline", base))}}
    results.append(row("profile", f"profiled step {config['preset']} vs {config['baseline']}", config,
                       summarize([merv["step_ms"]]), summarize([base["step_ms"]]),
                       reference_name=f"{config['baseline']} (profiled the same way)"))


# ----------------------------------------------------------------------------------------------- bench/ suites
BENCH_DIR = SOURCE_ROOT / "bench"
# Enough rounds for a median, few enough that every suite fits its area's budget on a GPU and on 2 CPU cores.
BENCH_OPTIONS = ["--benchmark-enable", "--benchmark-min-rounds=3", "--benchmark-max-time=0.5",
                 "--benchmark-warmup=on", "--benchmark-warmup-iterations=1"]


REFERENCE_IMPLS = ("release", "reference")  # values of a benchmark's `impl` parameter that mark the reference


def _param_value(value):
    """pytest-benchmark writes parameters that JSON cannot hold (a torch.dtype) as 'UNSERIALIZABLE[repr]'."""
    if isinstance(value, str) and value.startswith("UNSERIALIZABLE[") and value.endswith("]"):
        return value[len("UNSERIALIZABLE["):-1].replace("torch.", "")
    return value


def _timing_of(bench: dict) -> tuple[dict, str, dict]:
    """(ours dict in ms, timing source, extra_info less the timing). The figure of record is the CUDA-event median
    where the suite stored one (cuda_median_ms), else pytest-benchmark's host-clock median and quartiles."""
    extra = dict(bench.get("extra_info") or {})
    if "cuda_median_ms" in extra:
        ours = {"median_ms": extra.pop("cuda_median_ms"), "p20_ms": extra.pop("cuda_p20_ms", None),
                "p80_ms": extra.pop("cuda_p80_ms", None)}
        source = "CUDA events"
    else:
        stats = bench["stats"]
        ours = {"median_ms": stats["median"] * 1e3, "p20_ms": stats["q1"] * 1e3, "p80_ms": stats["q3"] * 1e3}
        source = "pytest-benchmark host clock (median, quartiles)"
    return {k: round(v, 4) for k, v in ours.items() if v is not None}, source, extra


def benchmark_rows(report: dict, suite: str) -> list[dict]:
    """pytest-benchmark's JSON -> one results row per benchmark. A benchmark whose `impl` parameter is not a
    reference gets the reference with otherwise equal parameters as its `reference`, and the speedup."""
    rows, by_key = [], {}
    for bench in report["benchmarks"]:
        ours, source, extra = _timing_of(bench)
        params = {k: _param_value(v) for k, v in (bench.get("params") or {}).items()}
        config = {"suite": suite, "params": params, "timing": source, **extra}
        r = {"area": "bench", "name": bench["fullname"].split("::", 1)[-1], "config": config, "ours": ours}
        rows.append(r)
        key = (bench["name"].split("[", 1)[0], json.dumps({k: v for k, v in params.items() if k != "impl"},
                                                         sort_keys=True, default=str))
        by_key.setdefault(key, []).append((params.get("impl"), r))
    for group in by_key.values():
        references = [r for impl, r in group if impl in REFERENCE_IMPLS]
        if len(references) != 1:
            continue
        ref = references[0]
        for impl, r in group:
            if r is not ref and impl is not None:
                r["reference"] = {"name": f"impl={ref['config']['params']['impl']}", **ref["ours"]}
                r["speedup"] = round(ref["ours"]["median_ms"] / r["ours"]["median_ms"], 3)
    return rows


def bench_suite_area(results: ResultsFile, ceilings: dict, *, suite: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "benchmarks.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite.relative_to(SOURCE_ROOT)),
                   *BENCH_OPTIONS, f"--benchmark-json={report_path}"]
        done = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True)
        if done.returncode not in (0, 5) or not report_path.exists():
            tail = "\n".join(done.stdout.splitlines()[-15:])
            raise RuntimeError(f"{suite.name} failed (exit {done.returncode}):\n{tail}\n{done.stderr[-1500:]}")
        report = json.loads(report_path.read_text())
    for r in benchmark_rows(report, suite.name):
        results.append(r)


register_area("trainer-1b", lambda r, c: trainer_area(r, c, gpu_preset="merv-1b", cpu_preset="tiny"))
# One process holds fp32 master weights, gradients and AdamW state: about 112 GB at 7B, so an H200, not an H100.
register_area("trainer-7b", lambda r, c: trainer_area(r, c, gpu_preset="merv-7b", cpu_preset=None, min_memory_gb=130),
              after="trainer-1b")
register_area("profile", profile_area, budget_s=240, after="trainer-7b")
for _suite in sorted(BENCH_DIR.glob("bench_*.py")):
    register_area(f"bench-{_suite.stem.removeprefix('bench_')}",
                  lambda r, c, suite=_suite: bench_suite_area(r, c, suite=suite))
