"""`merv-fast plan`: will a preset fit, how fast will it train, and which settings to run, for any cluster.

`plan(...)` evaluates the configuration `merv-fast train` would run (the trainer's micro-batch rule, the training
settings given) with the memory model (memory.py) and the step-time model (timing.py), then every alternative the
trainer offers (micro-batch among the divisors of each rank's share of the global batch, activation checkpointing
off / selective / full, FSDP2 full or hybrid sharding) and recommends the fastest that fits, with its reasons. Every
number says where it came from: a named constant with its source, the module shapes, or a results file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from typing import Any

from merv_fast.config import BASELINE_OF, ModelConfig, apply_overrides
from merv_fast.plan import memory as memory_model
from merv_fast.plan import timing as timing_model
from merv_fast.plan.hardware import Cluster, Figure, Rates, resolve_rates
from merv_fast.plan.memory import SOURCE_FRAME_PIXELS, MemoryPlan, memory_plan
from merv_fast.plan.shapes import ModelShapes, model_shapes
from merv_fast.plan.timing import TimePlan, encoder_seconds, time_plan
from merv_fast.plan.workload import DTYPE_BYTES, Workload, precision_for
from merv_fast.train.config import AC_MODES, TrainConfig

GIB = 2**30
MAX_MICRO_BATCH = 64  # the largest micro-batch the search considers
ENCODER_GRAPH_GAIN = Figure("ENCODER_GRAPH_GAIN", 0.02, "a CUDA graph of the encoders is recommended when it saves "
                            "more than 2% of the step")


_SHAPES: dict[str, ModelShapes] = {}


def shapes_of(cfg: ModelConfig) -> ModelShapes:
    """`model_shapes`, built once per configuration (a meta-device build of a 7B model takes about a second)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _SHAPES:
        _SHAPES[key] = model_shapes(cfg)
    return _SHAPES[key]


@dataclass
class Evaluated:
    workload: Workload
    memory: MemoryPlan
    time: TimePlan


def _attention(cfg: ModelConfig, device: str) -> str:
    """The backend the plan assumes: the configured one; `auto` is sdpa (what every install has; on a GPU with
    flash-attn installed `auto` picks flash_attn, which needs less: no dense mask, no repeated k/v)."""
    return "sdpa" if cfg.llm.attention == "auto" else cfg.llm.attention


def make_workload(s: ModelShapes, cluster: Cluster, train: TrainConfig, *, micro_batch: int, per_rank: int,
                  text_tokens: float, max_text_tokens: int, checkpointing: str, hybrid: bool,
                  frame_bytes: float | None = None, prefetch: bool = True) -> Workload:
    world = cluster.world
    frames = s.frames_sampled * 3 * SOURCE_FRAME_PIXELS.value if frame_bytes is None else frame_bytes
    device = "cpu" if cluster.gpu == "cpu" else "cuda"
    return Workload(
        micro_batch=micro_batch, micro_batches=per_rank // micro_batch, text_tokens=text_tokens,
        max_text_tokens=max_text_tokens, checkpointing=checkpointing, world=world,
        shard_group=cluster.gpus_per_node if hybrid and cluster.nodes > 1 else world,
        precision=precision_for(device, world, train.param_dtype),
        param_bytes=DTYPE_BYTES[train.param_dtype] if device == "cuda" else 4,
        reduce_bytes=DTYPE_BYTES[train.reduce_dtype] if device == "cuda" else 4,
        attention=_attention(s.config, device), loss=s.config.llm.loss, encoder_mode=s.config.encoder_runtime.mode,
        num_workers=train.num_workers, frame_bytes=frames, prefetch=prefetch and device == "cuda")


def evaluate(s: ModelShapes, w: Workload, cluster: Cluster, rates: Rates) -> Evaluated:
    return Evaluated(w, memory_plan(s, w, rates.memory_bytes, rates.runtime_reserved_bytes,
                                    rates.allocator_headroom), time_plan(s, w, cluster, rates))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, MAX_MICRO_BATCH) + 1) if n % d == 0]


def _constants() -> dict[str, dict]:
    """Every named constant of the memory and time models (a table of them, such as ENCODER_LIVE_I, entry by entry)."""
    found = {}
    for module in (memory_model, timing_model, sys.modules[__name__]):
        for value in vars(module).values():
            for f in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(f, Figure):
                    found[f.name] = f.to_dict()
    return found


# ----------------------------------------------------------------------------------------------- the plan
def plan(model_cfg: ModelConfig, train: TrainConfig, cluster: Cluster, *, micro_batch: int | None = None,
         text_tokens: float = 128, max_text_tokens: int | None = None, results: list[str] | None = None,
         ceilings: dict | None = None, frame_bytes: float | None = None, prefetch: bool = True,
         baseline: bool = True, search: bool = True) -> dict[str, Any]:
    """The plan as a JSON-able dict (`format_plan` prints it). `ceilings`: the calling run's measured ceilings (the
    GPU suite); `results`: results files whose measurements replace the tables' figures."""
    from merv_fast.train.loop import default_micro_batch

    world = cluster.world
    if cluster.gpu == "cpu" and world > 1:
        raise ValueError("--gpu cpu plans one process: the model has no figures for collectives between CPUs")
    if train.global_batch_size % world:
        raise ValueError(f"global_batch_size {train.global_batch_size} is not a multiple of the {world} GPUs "
                         "(--set global_batch_size=N)")
    per_rank = train.global_batch_size // world
    micro = micro_batch or train.micro_batch_size or default_micro_batch(per_rank)
    if per_rank % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the {per_rank} samples per GPU of each step")
    longest = max_text_tokens or model_cfg.llm.max_text_tokens
    if text_tokens > longest:
        raise ValueError(f"--text-tokens {text_tokens} exceeds --max-text-tokens {longest}")
    rates = resolve_rates(cluster, results, ceilings)
    s = shapes_of(model_cfg)

    def run(b: int, checkpointing: str, hybrid: bool, shapes: ModelShapes = s) -> Evaluated:
        w = make_workload(shapes, cluster, train, micro_batch=b, per_rank=per_rank, text_tokens=text_tokens,
                          max_text_tokens=longest, checkpointing=checkpointing, hybrid=hybrid,
                          frame_bytes=frame_bytes, prefetch=prefetch)
        return evaluate(shapes, w, cluster, rates)

    asked = run(micro, train.activation_checkpointing, train.hybrid_shard)
    out: dict[str, Any] = {
        "not_modelled": not_modelled(model_cfg, train),
        "preset": model_cfg.name, "cluster": cluster.to_dict(),
        "settings": {"global_batch_size": train.global_batch_size, "micro_batch": micro,
                     "micro_batches_per_step": per_rank // micro, "activation_checkpointing":
                         train.activation_checkpointing, "sharding": _sharding(train.hybrid_shard, cluster),
                     "text_tokens_mean": text_tokens, "text_tokens_max": longest,
                     "precision": asked.workload.precision.name, "attention": asked.workload.attention,
                     "loss": asked.workload.loss, "encoders.mode": asked.workload.encoder_mode},
        "memory": memory_dict(asked.memory),
        "time": time_dict(asked.time),
        "constants": {**rates.figures(), **_constants()},
    }
    if search:
        sharding = [train.hybrid_shard] if cluster.nodes == 1 else [False, True]
        table = {(b, ac, h): run(b, ac, h) for h in sharding for ac in AC_MODES for b in divisors(per_rank)}
        out["largest_micro_batch"] = {ac: max((b for (b, a, h), e in table.items() if a == ac and
                                               h == train.hybrid_shard and e.memory.fits), default=None)
                                      for ac in AC_MODES}
        out["recommendation"] = recommend(table, asked, cluster, rates, s)
    names = [e.name for e in model_cfg.encoders]
    if baseline and len(names) > 1 and "languagebind" in names:
        base_cfg = baseline_config(model_cfg)
        base = run(micro, train.activation_checkpointing, train.hybrid_shard, shapes_of(base_cfg))
        out["baseline"] = {"preset": base_cfg.name, "step_s": base.time.step_s,
                           "step_ratio": asked.time.step_s / base.time.step_s,
                           "gpu_ratio": asked.time.busy_s / base.time.busy_s}
    return out


def baseline_config(model_cfg: ModelConfig) -> ModelConfig:
    """The single-encoder baseline of a MERV configuration: the same model (overrides included) with LanguageBind
    alone, as the single-* presets are."""
    single = apply_overrides(model_cfg, {"encoders": ["languagebind"]})
    return replace(single, name=BASELINE_OF.get(model_cfg.name, f"{model_cfg.name} with languagebind only"))


# Settings the trainer has and the model does not describe: each is planned as if it were off.
NOT_MODELLED = {
    "packing": "packed rows (the plan pads every micro-batch to its longest sample)",
    "cpu_offload": "FSDP2 CPU offload (the plan keeps shards, gradients and AdamW state on the GPU)",
    "compile_llm": "torch.compile of the decoder layers (the plan times eager kernels)",
    "feature_cache": "training from the feature cache (the plan runs the encoders)",
}


def not_modelled(model_cfg: ModelConfig, train: TrainConfig) -> list[str]:
    notes = [why for key, why in NOT_MODELLED.items() if getattr(train, key)]
    if model_cfg.encoder_runtime.compile or model_cfg.encoder_runtime.prefetch:
        notes.append("encoders.compile / encoders.prefetch (the plan times the encoders eagerly, in line)")
    if model_cfg.llm.fused_layer_kernels:
        notes.append("llm.fused_layer_kernels (the plan counts transformers' Llama ops)")
    return notes


def _sharding(hybrid: bool, cluster: Cluster) -> str:
    if cluster.world == 1:
        return "none (one GPU)"
    return "hybrid (shard in a node, replicate across nodes)" if hybrid and cluster.nodes > 1 else "full"


def memory_dict(m: MemoryPlan) -> dict[str, Any]:
    return {"peak_bytes": int(m.peak_bytes), "needed_bytes": int(m.needed_bytes),
            "capacity_bytes": int(m.capacity_bytes), "fits": m.fits, "peak_at": m.peak_event,
            "items": [i.to_dict() for i in m.peak_items()],
            "state": {k: v.to_dict() for k, v in m.state.items()}}


def time_dict(t: TimePlan) -> dict[str, Any]:
    return {"step_s": t.step_s, "samples_per_s": t.samples_per_s, "tokens_per_s": t.tokens_per_s, "mfu": t.mfu,
            "comm_s": t.comm_s, "exposed_comm_s": t.exposed_comm_s, "comm_share": t.comm_share,
            "model_flops_per_sample": t.model_flops_per_sample, "phases": [p.to_dict() for p in t.phases],
            "overlap": "decoder-layer collectives hidden behind their layer's compute (FSDP2 prefetch); root and "
                       "visual-path collectives and everything beyond a layer's compute exposed; decoding beside "
                       "the GPU in DataLoader workers"}


def recommend(table: dict[tuple, Evaluated], asked: Evaluated, cluster: Cluster, rates: Rates,
              s: ModelShapes) -> dict[str, Any]:
    fitting = {key: e for key, e in table.items() if e.memory.fits}
    reasons = []
    for ac in AC_MODES:
        if not any(a == ac for (_, a, _) in fitting):
            smallest = min((e for (b, a, _), e in table.items() if a == ac), key=lambda e: e.memory.needed_bytes)
            reasons.append(f"activation_checkpointing={ac} does not fit at any micro-batch: it needs "
                           f"{smallest.memory.needed_bytes / GIB:.1f} GiB at micro-batch "
                           f"{smallest.workload.micro_batch} of the {rates.memory_bytes.value / GIB:.1f} GiB")
    if not fitting:
        return {"fits": False, "reasons": reasons + ["nothing fits: use more GPUs (a larger shard group), a "
                                                     "shorter --max-text-tokens, or the feature cache"]}
    (b, ac, hybrid), best = min(fitting.items(), key=lambda kv: (kv[1].time.step_s, -kv[0][0]))
    w = best.workload
    reasons.append(f"micro-batch {b} with activation_checkpointing={ac}: the fastest step that fits "
                   f"({best.time.step_s:.3f} s, {best.memory.needed_bytes / GIB:.1f} of "
                   f"{rates.memory_bytes.value / GIB:.1f} GiB)")
    if w.micro_batches > 1:
        reasons.append(f"{w.micro_batches} micro-batches per step: gradient accumulation keeps "
                       f"{'unsharded ' if w.fsdp else ''}gradients across them")
    elif w.fsdp and b > 1:
        reasons.append("one micro-batch per step: FSDP2 needs no unsharded gradient accumulation buffer")
    if cluster.nodes > 1:
        other = [e for (bb, a, h), e in fitting.items() if bb == b and a == ac and h != hybrid]
        if other:
            o = other[0]
            reasons.append(f"{'hybrid' if hybrid else 'full'} sharding: {best.time.step_s:.3f} s per step vs "
                           f"{o.time.step_s:.3f} s with {'full' if hybrid else 'hybrid'} (exposed communication "
                           f"{best.time.exposed_comm_s:.3f} vs {o.time.exposed_comm_s:.3f} s; shards of "
                           f"{w.shard_group} vs {o.workload.shard_group} ranks: memory "
                           f"{best.memory.needed_bytes / GIB:.1f} vs {o.memory.needed_bytes / GIB:.1f} GiB)")
    decode = next(ph for ph in best.time.phases if ph.name.startswith("decode"))
    if decode.seconds > 0:
        reasons.append(f"decoding is exposed: {decode.seconds:.3f} s of the step waits for the DataLoader "
                       f"({decode.basis}); raise num_workers (--set num_workers=N) up to the cores per GPU "
                       f"({rates.cpu_cores_per_gpu.value:g})")
    mode, why = _encoder_mode(s, w, best.time.step_s, rates)
    reasons.append(why)
    if asked.memory.fits:
        gain = asked.time.step_s / best.time.step_s
        reasons.append(f"the configuration asked for fits ({asked.memory.needed_bytes / GIB:.1f} GiB); the "
                       f"recommendation is {gain:.2f}x its speed")
    else:
        reasons.append(f"the configuration asked for does NOT fit: it needs {asked.memory.needed_bytes / GIB:.1f} "
                       f"GiB (peak at {asked.memory.peak_event})")
    return {"fits": True, "micro_batch": b, "activation_checkpointing": ac,
            "sharding": _sharding(hybrid, cluster), "encoders.mode": mode, "step_s": best.time.step_s,
            "samples_per_s": best.time.samples_per_s, "mfu": best.time.mfu, "reasons": reasons}


def _encoder_mode(s: ModelShapes, w: Workload, step_s: float, rates: Rates) -> tuple[str, str]:
    """One CUDA graph removes the encoders' launches and costs a memory pool: worth it when the launches are a
    visible share of the step and the pool fits."""
    if w.precision.name == "fp32":
        return "sequential", "encoders.mode=sequential: on a CPU every mode runs sequentially"
    eager = encoder_seconds(s, w, rates)
    graph_w = replace(w, encoder_mode="graph")
    saved = w.micro_batches * (eager - encoder_seconds(s, graph_w, rates))  # per step
    memory = memory_plan(s, graph_w, rates.memory_bytes, rates.runtime_reserved_bytes, rates.allocator_headroom)
    if saved > ENCODER_GRAPH_GAIN.value * step_s and memory.fits:
        return "graph", (f"encoders.mode=graph: at micro-batch {w.micro_batch} the encoders' kernel launches cost "
                         f"{saved * 1e3:.1f} ms of a {step_s * 1e3:.0f} ms step; one CUDA graph replays them without "
                         f"(its pool fits: {memory.needed_bytes / GIB:.1f} GiB)")
    why = (f"it would save {saved * 1e3:.1f} ms of a {step_s * 1e3:.0f} ms step" if memory.fits else
           f"its pool does not fit ({memory.needed_bytes / GIB:.1f} GiB)")
    return "sequential", (f"encoders.mode=sequential: the encoders are compute-bound at micro-batch "
                          f"{w.micro_batch}; a CUDA graph: {why}")


# ----------------------------------------------------------------------------------------------- printing
def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:8.2f} MiB"


def format_plan(p: dict[str, Any]) -> str:
    c, st, m, t = p["cluster"], p["settings"], p["memory"], p["time"]
    where = (f"{c['world']} x {c['gpu']} ({c['nodes']} node(s) x {c['gpus_per_node']}, {c['interconnect']})"
             if c["gpu"] != "cpu" else "one CPU process")
    lines = [f"merv-fast plan: {p['preset']} on {where}, sharding {st['sharding']}",
             f"micro-batch {st['micro_batch']} x {st['micro_batches_per_step']} per step (global batch "
             f"{st['global_batch_size']}), activation_checkpointing={st['activation_checkpointing']}, "
             f"{st['precision']}, text tokens mean {st['text_tokens_mean']:g} / longest {st['text_tokens_max']}, "
             f"attention {st['attention']}, loss {st['loss']}, encoders.mode={st['encoders.mode']}",
             *(f"not modelled, planned as if off: {note}" for note in p["not_modelled"]),
             "", f"memory per GPU at its peak ({m['peak_at']}):"]
    lines += [f"  {i['name'][:62]:62} {_gib(i['bytes'])}   {i['from']}" for i in m["items"] if i["bytes"]]
    lines += [f"  {'live tensors at the peak':62} {_gib(m['peak_bytes'])}",
              f"  {'with allocator headroom and runtime reserve':62} {_gib(m['needed_bytes'])}   "
              "ALLOCATOR_HEADROOM, RUNTIME_RESERVED_BYTES",
              f"  {'device memory':62} {_gib(m['capacity_bytes'])}   -> "
              f"{'fits' if m['fits'] else 'DOES NOT FIT'}"]
    if "largest_micro_batch" in p:
        lines.append("  largest micro-batch that fits: " + ", ".join(
            f"{ac} {b if b is not None else 'none'}" for ac, b in p["largest_micro_batch"].items()))
    lines += ["", "time per step, per GPU:"]
    lines += [f"  {ph['name'][:62]:62} {ph['seconds']:10.4f} s   {ph['from']}" for ph in t["phases"]]
    lines += [f"  {'step':62} {t['step_s']:10.4f} s",
              f"  samples/s {t['samples_per_s']:.2f}, tokens/s {t['tokens_per_s']:.0f}, MFU {t['mfu']:.3f}; "
              f"collectives {t['comm_s']:.4f} s per step, {t['exposed_comm_s']:.4f} s exposed "
              f"({t['comm_share']:.1%} of the step)",
              f"  overlap: {t['overlap']}"]
    if "baseline" in p:
        b = p["baseline"]
        lines.append(f"  MERV / single-encoder ({b['preset']}) step time: {b['step_ratio']:.2f} "
                     f"(GPU time without exposed decoding: {b['gpu_ratio']:.2f})")
    if "recommendation" in p:
        r = p["recommendation"]
        lines += ["", "recommendation:" if r["fits"] else "recommendation: nothing fits"]
        if r["fits"]:
            lines.append(f"  --micro-batch {r['micro_batch']} --set activation_checkpointing="
                         f"{r['activation_checkpointing']}, sharding {r['sharding']}, "
                         f"--set encoders.mode={r['encoders.mode']}: {r['step_s']:.3f} s per step, "
                         f"{r['samples_per_s']:.2f} samples/s, MFU {r['mfu']:.3f}")
        lines += [f"  - {reason}" for reason in r["reasons"]]
    lines += ["", "constants and measurements used:"]
    lines += [f"  {name} = {v['value']:.6g}   ({v['source']})" for name, v in p["constants"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the command
@dataclass
class PlanRequest:
    """`merv-fast plan`'s arguments: what to plan and where."""

    preset: str = "merv-7b"
    config: str | None = None  # YAML of model-config overrides
    overrides: list[str] | None = None  # `key=value`: training settings (TrainConfig) or model-config keys
    recipe: str = "merv-frozen"
    gpu: str = "h100"
    gpus_per_node: int | None = None  # default: 8, or 1 for the cpu device
    nodes: int = 1
    interconnect: str = "ib-400"
    cpu_cores_per_node: int | None = None
    micro_batch: int | None = None
    text_tokens: float = 128
    max_text_tokens: int | None = None
    results: list[str] | None = None


def run_request(r: PlanRequest) -> dict[str, Any]:
    from merv_fast.config import load_config, parse_cli_overrides
    from merv_fast.train.config import make_train_config, split_overrides

    train_over, model_over = split_overrides(parse_cli_overrides(r.overrides or []))
    model_cfg = load_config(r.preset, r.config, model_over)
    train = make_train_config(r.recipe, overrides=train_over, preset=model_cfg.name)
    per_node = r.gpus_per_node if r.gpus_per_node is not None else (1 if r.gpu == "cpu" else 8)
    cluster = Cluster(r.gpu, per_node, r.nodes, r.interconnect, r.cpu_cores_per_node)
    if r.micro_batch is not None and r.micro_batch < 1:
        raise ValueError(f"--micro-batch must be positive, got {r.micro_batch}")
    return plan(model_cfg, train, cluster, micro_batch=r.micro_batch, text_tokens=r.text_tokens,
                max_text_tokens=r.max_text_tokens, results=r.results or None)
