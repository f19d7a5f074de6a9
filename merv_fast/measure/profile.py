"""`merv-fast profile`: where a training step's time goes, for MERV and for its single-encoder baseline.

Both models run the bench's training step (merv_fast.train.bench.StepRunner): W warm-up steps, then K steps under
torch.profiler. Every phase sits in a `record_function` range: data, each encoder by name (forward hooks on the
encoder modules), pooling, projection+fusion (the visual path less pooling), LLM forward, backward, optimizer, and
communication when torch.distributed is initialised (the NCCL/c10d events of the trace). Outputs, in --out:

- `trace_<preset>.json` per model: a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing);
- `profile.json`: the per-phase tables and the encoders' intervals;
- a printed per-phase table (ms per step and share of the step) for both models, side by side;
- `phases_<merv>_vs_<baseline>.png` (phase bars) and `encoders_timeline_<preset>.png` (each encoder's start/end on
  the host and, on a GPU, on the device, one panel per profiled step: bars that overlap in time ran concurrently).

Phase times come from the trace itself: on a GPU the `gpu_user_annotation` ranges (first kernel start to last kernel
end of each range, i.e. device time), on a CPU the host ranges.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function

from merv_fast.config import get_preset
from merv_fast.data.synthetic import synthetic_batches
from merv_fast.train.bench import BenchSettings, StepRunner

STEP = "merv_step"
PHASE_PREFIX = "phase:"
ENCODER_PREFIX = "encoder:"
POOLING = "pooling"
COMM_MARKERS = ("nccl", "c10d::", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast_")


@dataclass
class ProfileSettings:
    preset: str | None = None  # default: tiny on CPU, merv-1b on a GPU
    baseline: str | None = None  # default: the preset's single-encoder twin
    steps: int = 3
    warmup: int = 2
    batch_size: int | None = None
    text_tokens: int = 128
    seed: int = 0
    device: str | None = None
    out: str = "runs/profile"
    overrides: dict = field(default_factory=dict)

    def bench_settings(self) -> BenchSettings:
        return BenchSettings(preset=self.preset, baseline=self.baseline, batch_size=self.batch_size,
                             text_tokens=self.text_tokens, steps=self.steps, warmup=self.warmup, seed=self.seed,
                             device=self.device, overrides=dict(self.overrides)).resolve()


# --------------------------------------------------------------------------------------------- instrumentation
@contextlib.contextmanager
def instrumented(model):
    """record_function ranges around each encoder's forward (`encoder:<name>`) and the visual path's pooling."""
    handles, open_ranges = [], {}
    for name, encoder in model.encoders.items():
        def pre(module, args, name=name):
            rf = record_function(ENCODER_PREFIX + name)
            rf.__enter__()
            open_ranges[name] = rf

        def post(module, args, output, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [encoder.register_forward_pre_hook(pre), encoder.register_forward_hook(post)]
    visual = model.visual
    original_pool = visual.pool

    def pool(*args, **kwargs):
        with record_function(POOLING):
            return original_pool(*args, **kwargs)

    visual.pool = pool  # an instance attribute shadows the method while profiling
    try:
        yield
    finally:
        del visual.pool
        for h in handles:
            h.remove()


@contextlib.contextmanager
def without_kineto_markers():
    """The profiler library (kineto) writes `USDT:... profiler_start/stop` to the process's stderr (fd 2, from C++)
    at every start and stop, and KINETO_LOG_LEVEL can hide them only together with its errors. So fd 2 goes to a
    file while profiling, and everything else written there is passed on to stderr afterwards: nothing is lost."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _phase(name: str):
    return record_function(PHASE_PREFIX + name)


def profile_model(preset: str, s: BenchSettings, batches, trace_path: Path) -> dict[str, Any]:
    """W warm-up steps, then K profiled steps; writes the trace and returns its summary."""
    runner = StepRunner(preset, s)
    for i in range(s.warmup):
        runner.step(batches[i % len(batches)])
    if runner.gpu:
        torch.cuda.synchronize(runner.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.gpu else [])
    with without_kineto_markers(), instrumented(runner.model), torch.profiler.profile(activities=activities) as prof:
        for i in range(s.steps):
            with record_function(STEP):
                loss = runner.step(batches[(s.warmup + i) % len(batches)], _phase)
            if runner.gpu:
                torch.cuda.synchronize(runner.device)
            prof.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{preset}: loss is {loss.item()} while profiling")
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    summary = summarize_trace(json.loads(trace_path.read_text()), steps=s.steps,
                              encoders=list(runner.model.encoders), distributed=_distributed())
    summary.update(preset=preset, trace=str(trace_path))
    del runner, prof
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------- trace analysis
def _events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def summarize_trace(trace: dict, *, steps: int, encoders: list[str], distributed: bool = False) -> dict[str, Any]:
    """Per-phase ms per step and share of the step, from a Chrome trace's annotation ranges, plus each encoder's
    intervals (relative to its step's start) on the host and, when the trace has them, on the device."""
    events = _events(trace)
    host = [e for e in events if e.get("cat") == "user_annotation"]
    device = [e for e in events if e.get("cat") == "gpu_user_annotation"]
    source = "device" if device else "host"
    totals: dict[str, dict[str, float]] = {"host": defaultdict(float), "device": defaultdict(float)}
    for kind, evs in (("host", host), ("device", device)):
        for e in evs:
            totals[kind][e["name"]] += float(e["dur"]) / 1e3

    def per_step(label: str) -> float:
        table = totals[source] if label in totals[source] else totals["host"]
        return table.get(label, 0.0) / max(steps, 1)

    step_ms = per_step(STEP)
    rows: list[tuple[str, float]] = [("data", per_step(PHASE_PREFIX + "data"))]
    rows += [(f"encoder {name}", per_step(ENCODER_PREFIX + name)) for name in encoders]
    pooling = per_step(POOLING)
    rows += [("pooling", pooling), ("projection+fusion", max(per_step(PHASE_PREFIX + "visual") - pooling, 0.0)),
             ("llm forward", per_step(PHASE_PREFIX + "llm_forward")), ("backward", per_step(PHASE_PREFIX + "backward")),
             ("optimizer", per_step(PHASE_PREFIX + "optimizer"))]
    comm = sum(float(e["dur"]) for e in events
               if e.get("cat") in ("kernel", "cpu_op") and any(m in e["name"].lower() for m in COMM_MARKERS))
    comm = comm / 1e3 / max(steps, 1)
    if distributed or comm > 0:
        rows.append(("communication", comm))
    rows.append(("other", max(step_ms - sum(ms for _, ms in rows), 0.0)))
    phases = [{"phase": name, "ms_per_step": ms, "share": ms / step_ms if step_ms > 0 else 0.0} for name, ms in rows]
    return {"source": source, "steps": steps, "step_ms": step_ms, "phases": phases,
            "encoder_intervals": encoder_intervals(host, device, encoders)}


def encoder_intervals(host: list[dict], device: list[dict], encoders: list[str]) -> dict[str, Any]:
    """{lane: {encoder: [[start_ms, end_ms, step], ...]}}, times relative to the start of the profiled step (0, 1,
    ...) each range falls in, and the time per step during which two or more encoders ran at once, per lane."""
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in host if e["name"] == STEP)
    out: dict[str, Any] = {"lanes": {}, "overlap_ms_per_step": {}}
    for lane, evs in (("host", host), ("device", device)):
        spans: dict[str, list[list[float]]] = {}
        absolute: list[tuple[list[float], str]] = []
        for name in encoders:
            spans[name] = []
            for e in evs:
                if e["name"] != ENCODER_PREFIX + name:
                    continue
                start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
                step = next((k for k in reversed(range(len(steps))) if steps[k][0] <= start), 0)
                origin = steps[step][0] if steps else start
                spans[name].append([(start - origin) / 1e3, (end - origin) / 1e3, step])
                absolute.append(([start / 1e3, end / 1e3], name))
        if any(spans.values()):
            out["lanes"][lane] = spans
            out["overlap_ms_per_step"][lane] = (_overlap([iv for iv, _ in absolute], [o for _, o in absolute])
                                                / max(len(steps), 1))
    return out


def _overlap(intervals: list[list[float]], owners: list[str]) -> float:
    """Total time during which intervals of two or more different owners are open (a sweep over the endpoints)."""
    points = sorted([(iv[0], 1, o) for iv, o in zip(intervals, owners)] + [(iv[1], -1, o) for iv, o in
                                                                           zip(intervals, owners)],
                    key=lambda p: (p[0], p[1]))
    open_count: dict[str, int] = defaultdict(int)
    total, last = 0.0, None
    for t, delta, owner in points:
        if last is not None and sum(1 for c in open_count.values() if c > 0) >= 2:
            total += t - last
        open_count[owner] += delta
        last = t
    return total


# --------------------------------------------------------------------------------------------- report
def format_table(merv: dict[str, Any], base: dict[str, Any]) -> str:
    names = [p["phase"] for p in merv["phases"]]
    names += [p["phase"] for p in base["phases"] if p["phase"] not in names]
    names = [n for n in names if n != "other"] + ["other"]
    m = {p["phase"]: p for p in merv["phases"]}
    b = {p["phase"]: p for p in base["phases"]}

    def cells(table, name):
        p = table.get(name)
        return ("-", "-") if p is None else (f"{p['ms_per_step']:.3f}", f"{100 * p['share']:.1f}%")

    lines = [f"per-phase time ({merv['source']} ranges, ms per step over {merv['steps']} profiled steps)",
             f"{'phase':24}{merv['preset'] + ' ms':>16}{'share':>8}{base['preset'] + ' ms':>18}{'share':>8}"]
    for name in names:
        mc, bc = cells(m, name), cells(b, name)
        lines.append(f"{name:24}{mc[0]:>16}{mc[1]:>8}{bc[0]:>18}{bc[1]:>8}")
    lines.append(f"{'step':24}{merv['step_ms']:>16.3f}{'100%':>8}{base['step_ms']:>18.3f}{'100%':>8}")
    for lane, ms in merv["encoder_intervals"]["overlap_ms_per_step"].items():
        lines.append(f"{merv['preset']}: encoders ran concurrently for {ms:.3f} ms per step ({lane})")
    return "\n".join(lines)


def save_plots(merv: dict[str, Any], base: dict[str, Any], out: Path) -> list[Path]:
    """The phase bars and one encoder timeline per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # phase bars, MERV vs baseline
    names = [p["phase"] for p in merv["phases"]]
    names += [p["phase"] for p in base["phases"] if p["phase"] not in names]
    m = {p["phase"]: p["ms_per_step"] for p in merv["phases"]}
    b = {p["phase"]: p["ms_per_step"] for p in base["phases"]}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [m.get(n, 0.0) for n in names], height=0.4, label=merv["preset"])
    ax.barh([y + 0.2 for y in ys], [b.get(n, 0.0) for n in names], height=0.4, label=base["preset"])
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per step ({merv['source']} ranges)")
    ax.set_title(f"phases: {merv['preset']} (step {merv['step_ms']:.1f} ms) vs {base['preset']} "
                 f"(step {base['step_ms']:.1f} ms)")
    ax.legend()
    fig.tight_layout()
    path = out / f"phases_{merv['preset']}_vs_{base['preset']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # encoder timeline per model: one panel per profiled step, so that only ranges of the same step share an axis
    for summary in (merv, base):
        lanes = summary["encoder_intervals"]["lanes"]
        rows = [(lane, name, ivs) for lane, spans in lanes.items() for name, ivs in spans.items()]
        if not rows:
            continue
        steps = sorted({iv[2] for _, _, ivs in rows for iv in ivs})
        fig, axes = plt.subplots(len(steps), 1, figsize=(9, (0.5 * len(rows) + 1.0) * len(steps) + 0.5),
                                 squeeze=False, sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        names = list(next(iter(lanes.values())))
        for ax, step in zip(axes[:, 0], steps):
            for y, (lane, name, ivs) in enumerate(rows):
                ax.broken_barh([(s0, s1 - s0) for s0, s1, k in ivs if k == step], (y - 0.4, 0.8),
                               color=colors[names.index(name) % len(colors)], alpha=0.6)
            ax.set_yticks(range(len(rows)), [f"{name} ({lane})" for lane, name, _ in rows])
            ax.invert_yaxis()
            ax.set_title(f"profiled step {step + 1}", fontsize=9)
        axes[-1, 0].set_xlabel("ms from the start of the step")
        overlap = ", ".join(f"{lane} {ms:.2f} ms" for lane, ms in
                            summary["encoder_intervals"]["overlap_ms_per_step"].items())
        fig.suptitle(f"{summary['preset']}: encoder timeline (concurrent per step: {overlap})")
        fig.tight_layout()
        path = out / f"encoders_timeline_{summary['preset']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def run_profile(settings: ProfileSettings | None = None) -> dict[str, Any]:
    settings = settings or ProfileSettings()
    s = settings.bench_settings()
    if s.steps < 1:
        raise ValueError("--steps must be at least 1")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = synthetic_batches(get_preset(s.preset), s.batch_size, s.text_tokens, count=2, seed=s.seed)
    merv = profile_model(s.preset, s, batches, out / f"trace_{s.preset}.json")
    base_cfg = get_preset(s.baseline)  # its own frame sampling (the release's rule) over the same synthetic clips
    if base_cfg.frames_sampled != get_preset(s.preset).frames_sampled:
        batches = synthetic_batches(base_cfg, s.batch_size, s.text_tokens, count=2, seed=s.seed)
    base = profile_model(s.baseline, replace(s), batches, out / f"trace_{s.baseline}.json")
    print(format_table(merv, base))
    plots = save_plots(merv, base, out)
    report = {"merv": merv, "baseline": base, "device": s.device, "batch_size": s.batch_size,
              "text_tokens": s.text_tokens, "warmup": s.warmup, "plots": [str(p) for p in plots]}
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {merv['trace']}, {base['trace']}, {out / 'profile.json'}"
          + "".join(f", {p}" for p in plots))
    return report
