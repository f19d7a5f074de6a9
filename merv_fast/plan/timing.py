"""Time of one optimizer step per GPU, itemised by phase, from the FLOPs and bytes of each op class.

Each op class (the projections of a decoder layer, its attention, its norms, ...) costs the largest of: its matrix
FLOPs at the GEMM rate, its attention FLOPs at the attention rate, its bytes read and written at the memory rate,
and its kernel count times the per-kernel floor (eager mode cannot launch faster). Backward costs twice the
forward's products and memory traffic (the attention backward twice its forward, as merv_fast.model.flops counts
it); a checkpointed layer runs its forward again in backward. FLOPs come from merv_fast.model.flops (the same
counting as MFU) and the module shapes.

Communication (FSDP2, `parallel.shard_model`): per micro-batch every unit is all-gathered for forward and, except
the last layer and the root (kept gathered), again for backward; on the step's last micro-batch each unit's
gradients are reduce-scattered (and, hybrid, all-reduced across nodes). Collectives are NCCL rings: (n-1)/n of the
data over the ring's bus bandwidth plus n-1 hop latencies (2x for an all-reduce). Overlap, as FSDP2 schedules it:
a decoder layer's collectives run beside the neighbouring layer's compute, so only what exceeds that layer's compute
is exposed; the root's and the visual path's collectives (first in forward, last in backward) are not hidden.
Decoding runs in DataLoader workers beside the GPU: only what exceeds the step is exposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from merv_fast.kernels.fused_linear_ce import CHUNK_ELEMENTS
from merv_fast.model.flops import encoder_flop_parts, sample_flops
from merv_fast.plan.hardware import Cluster, Figure, Rates
from merv_fast.plan.memory import layer_linear_params
from merv_fast.plan.shapes import ModelShapes
from merv_fast.plan.workload import Workload

BACKWARD_FACTOR = Figure("BACKWARD_FACTOR", 2.0, "a backward pass does twice its forward's products (input and "
                         "weight gradients) and reads/writes about twice its bytes")
# Kernels per op class in eager mode (what the per-kernel floor multiplies), counted from the modules' forward code.
KERNELS = {"rmsnorm": 8, "rotary": 12, "swiglu": 2, "residual": 2, "layout": 1, "projections": 7, "attention": 1,
           "encoder_block": 15, "temporal_block": 8, "loss_chunk": 12, "optimizer": 15, "preprocess": 2}


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # matmul | attention | memory
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 1


def op_seconds(op: Op, rates: Rates, launched: bool = True) -> float:
    """`launched`: eager kernels, each at least the launch floor; False for a replayed CUDA graph."""
    rate = {"matmul": rates.matmul_flop_s, "attention": rates.attention_flop_s}.get(op.kind)
    compute = op.flops / rate.value if rate is not None and op.flops else 0.0
    floor = op.kernels * rates.op_floor_s.value if launched else 0.0
    return max(compute, op.bytes / rates.memory_bytes_s.value, floor)


def _seconds(ops: list[Op], rates: Rates, launched: bool = True) -> float:
    return sum(op_seconds(o, rates, launched) for o in ops)


def encoder_seconds(s: ModelShapes, w: Workload, rates: Rates) -> float:
    """The encoders' forward: eager kernels, or (encoders.mode=graph on a GPU) one graph replay without launches.
    Streams run the same kernels: a full-size encoder fills the GPU, so concurrency is not modelled as a gain."""
    graph = w.encoder_mode == "graph" and w.precision.name != "fp32"
    return _seconds(encoder_ops(s, w), rates, launched=not graph)


def _scaled(ops: list[Op], factor: float) -> list[Op]:
    return [Op(o.name, o.kind, o.flops * factor, o.bytes * factor, int(round(o.kernels * factor))) for o in ops]


# ----------------------------------------------------------------------------------------------- op inventories
def layer_forward_ops(s: ModelShapes, w: Workload) -> list[Op]:
    """One decoder layer's forward over the micro-batch (padded to the mean text length)."""
    p, b = w.precision, w.micro_batch
    seq = w.text_tokens + s.visual_tokens
    t = b * seq
    d, kv, i = s.hidden, s.kv_width, s.intermediate
    linear = layer_linear_params(s)
    ops = [
        Op("projections", "matmul", 2 * t * linear, p.act * (t * (3 * d + 2 * kv + 3 * i) + linear),
           KERNELS["projections"]),
        Op("attention", "attention", 2 * b * seq * seq * d, p.act * t * (3 * d + 2 * kv), KERNELS["attention"]),
        Op("RMSNorm x2", "memory", bytes=2 * t * d * (2 * p.residual + 24), kernels=2 * KERNELS["rmsnorm"]),
        Op("rotary embedding", "memory", bytes=10 * p.act * t * (d + kv), kernels=KERNELS["rotary"]),
        Op("SwiGLU", "memory", bytes=5 * p.act * t * i, kernels=KERNELS["swiglu"]),
        Op("residual adds", "memory", bytes=2 * 3 * p.residual * t * d, kernels=KERNELS["residual"]),
        Op("attention layout copy", "memory", bytes=2 * p.act * t * d, kernels=KERNELS["layout"]),
    ]
    if p.casts_weights:  # autocast: every weight cast per forward, every projection input cast per call
        ops.append(Op("autocast casts", "memory", bytes=6 * linear + 5 * t * d * (p.residual + p.act), kernels=12))
    return ops


def encoder_ops(s: ModelShapes, w: Workload) -> list[Op]:
    p, b, ops = w.precision, w.micro_batch, []
    for e, cfg in zip(s.encoders, s.config.encoders):
        products, attention = encoder_flop_parts(cfg)
        tokens = b * e.sequences * e.seq_len
        per_block = 14 * e.width + 2 * e.intermediate + (9 * e.width if e.temporal else 0)
        kernels = KERNELS["encoder_block"] + (KERNELS["temporal_block"] if e.temporal else 0)
        ops += [Op(f"{e.name}: products", "matmul", b * products, p.encoder * e.params, 6 * e.layers + 1),
                Op(f"{e.name}: attention", "attention", b * attention, p.encoder * tokens * 4 * e.width * e.layers,
                   e.layers * (2 if e.temporal else 1)),
                Op(f"{e.name}: norms, activations, residuals", "memory",
                   bytes=p.encoder * tokens * per_block * e.layers, kernels=kernels * e.layers)]
    return ops


def visual_ops(s: ModelShapes, w: Workload) -> list[Op]:
    """Pooling (reads the features, writes [B, L, K]), then the fused projection forward and its weight gradient
    (the pooled input needs none: the encoders are frozen)."""
    p, b = w.precision, w.micro_batch
    feats = b * sum(e.feature_numel for e in s.encoders) * p.encoder
    pooled = b * s.visual_tokens * s.pooled_width * p.act
    product = 2 * b * s.visual_tokens * s.pooled_width * s.hidden
    return [Op("pooling", "memory", bytes=feats + pooled, kernels=2 * len(s.encoders)),
            Op("projection + fusion, forward and weight gradient", "matmul", 2 * product,
               2 * pooled + 2 * b * s.visual_tokens * s.hidden * p.act, 6)]


def loss_ops(s: ModelShapes, w: Workload) -> list[Op]:
    p, b, d, v = w.precision, w.micro_batch, s.hidden, s.vocab
    if w.loss == "fused":  # logits, hidden-row gradients and weight gradient of the supervised rows, in forward
        rows = b * w.text_tokens
        chunks = max(1, -(-int(rows) // max(1, CHUNK_ELEMENTS // v)))
        return [Op("LM head + loss (fused, supervised rows)", "matmul", 3 * 2 * rows * d * v,
                   rows * v * (2 * p.act + 16) + chunks * v * d * (8 + p.act), KERNELS["loss_chunk"] * chunks)]
    t = b * (w.text_tokens + s.visual_tokens)
    return [Op("LM head + loss (plain, every position)", "matmul", 3 * 2 * t * d * v, 2 * t * v * (p.act + 12), 10)]


def data_ops(s: ModelShapes, w: Workload) -> list[Op]:
    pixels = w.micro_batch * sum(e.frames * 3 * e.image_size ** 2 for e in s.encoders) * w.precision.encoder
    return [Op("preprocess (resize, normalise) on the device", "memory", bytes=w.micro_batch * w.frame_bytes + pixels,
               kernels=KERNELS["preprocess"] * len(s.encoders))]


# ----------------------------------------------------------------------------------------------- communication
def ring_seconds(data_bytes: float, ranks: int, bus: Figure, hop: Figure, passes: int = 1) -> float:
    """An NCCL ring all-gather / reduce-scatter (passes=1) or all-reduce (passes=2) of `data_bytes` (the full,
    unsharded size) over `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return passes * ((ranks - 1) / ranks * data_bytes / bus.value + (ranks - 1) * hop.value)


@dataclass
class Comm:
    """Per-unit collective seconds of one micro-batch."""

    all_gather: dict[str, float] = field(default_factory=dict)
    reduce: dict[str, float] = field(default_factory=dict)  # reduce-scatter (+ the cross-node all-reduce, hybrid)


def unit_comm(s: ModelShapes, w: Workload, cluster: Cluster, rates: Rates) -> Comm:
    comm = Comm()
    if not w.fsdp:
        return comm
    g = w.shard_group
    inside = g <= cluster.gpus_per_node  # full sharding over several nodes spans them; hybrid stays in a node
    bus, hop = ((rates.intra_bytes_s, rates.hop_latency_intra_s) if inside else
                (rates.inter_bytes_s, rates.hop_latency_inter_s))
    replicas = w.world // g
    for unit in s.units:
        comm.all_gather[unit.name] = ring_seconds(w.param_bytes * unit.numel(), g, bus, hop)
        grads = w.reduce_bytes * unit.numel(True)
        reduce = ring_seconds(grads, g, bus, hop)
        if replicas > 1:  # hybrid: the reduced shard is all-reduced across nodes, one ring per local rank
            reduce += ring_seconds(grads / g, replicas, rates.nic_bytes_s, rates.hop_latency_inter_s, passes=2)
        comm.reduce[unit.name] = reduce
    return comm


# ----------------------------------------------------------------------------------------------- the step
@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    basis: str

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "from": self.basis}


@dataclass
class TimePlan:
    phases: list[Phase]  # per step (micro-batch phases times k)
    step_s: float
    comm_s: float  # every collective of the step, hidden or not
    exposed_comm_s: float
    samples_per_s: float
    tokens_per_s: float
    mfu: float
    model_flops_per_sample: float

    @property
    def busy_s(self) -> float:
        """The step without its exposed decoding: what the device itself does."""
        return self.step_s - sum(p.seconds for p in self.phases if p.name.startswith("decode"))

    @property
    def comm_share(self) -> float:
        """Exposed communication over the step: what more bandwidth would buy back."""
        return self.exposed_comm_s / self.step_s if self.step_s else 0.0


def _unit_exposed(s: ModelShapes, comm: Comm, forward: list[float], backward: list[float], sync: bool) -> float:
    """Exposed collective time of one micro-batch: each decoder layer's beyond its own compute; root and visual
    path in full."""
    exposed = 0.0
    for i, unit in enumerate(s.decoder_units):
        exposed += max(0.0, comm.all_gather.get(unit.name, 0.0) - forward[i])
        again = comm.all_gather.get(unit.name, 0.0) if i < s.layers - 1 else 0.0  # the last layer stays gathered
        exposed += max(0.0, again + (comm.reduce.get(unit.name, 0.0) if sync else 0.0) - backward[i])
    for unit in (s.visual_unit, s.root_unit):
        gathers = 2 if unit is s.visual_unit else 1  # the root is not resharded after forward
        exposed += gathers * comm.all_gather.get(unit.name, 0.0) + (comm.reduce.get(unit.name, 0.0) if sync else 0)
    return exposed


def _total_comm(s: ModelShapes, comm: Comm, sync: bool) -> float:
    total = 0.0
    for i, unit in enumerate(s.units):
        gathers = 1 if unit is s.root_unit or (i == s.layers - 1) else 2
        total += gathers * comm.all_gather.get(unit.name, 0.0) + (comm.reduce.get(unit.name, 0.0) if sync else 0)
    return total


def time_plan(s: ModelShapes, w: Workload, cluster: Cluster, rates: Rates) -> TimePlan:
    k = w.micro_batches
    layer_fwd = _seconds(layer_forward_ops(s, w), rates)
    layer_bwd = _seconds(_scaled(layer_forward_ops(s, w), BACKWARD_FACTOR.value), rates)
    forward = [layer_fwd] * s.layers
    backward = [layer_bwd + (layer_fwd if w.checkpointed(i) else 0.0) for i in range(s.layers)]
    seq = w.text_tokens + s.visual_tokens
    t = w.micro_batch * seq
    embed = Op("embedding lookup / gradient", "memory",
               bytes=3 * t * s.hidden * w.precision.residual + s.vocab * s.hidden * w.precision.residual, kernels=4)
    loss = _seconds(loss_ops(s, w), rates)
    encoders = encoder_seconds(s, w, rates)
    visual = _seconds(visual_ops(s, w), rates)
    data = _seconds(data_ops(s, w), rates)
    comm = unit_comm(s, w, cluster, rates)
    exposed = (k - 1) * _unit_exposed(s, comm, forward, backward, False) + _unit_exposed(s, comm, forward,
                                                                                         backward, True)
    total_comm = (k - 1) * _total_comm(s, comm, False) + _total_comm(s, comm, True)
    hop = rates.hop_latency_inter_s if cluster.nodes > 1 else rates.hop_latency_intra_s
    # A few bytes each: NCCL runs them as a tree, up and down, log2(ranks) hops each way.
    bookkeeping = 3 * 2 * math.ceil(math.log2(w.world)) * hop.value if w.fsdp else 0.0
    group = w.shard_group if w.fsdp else 1
    local_trainable = sum(p.shard_numel(group) for u in s.units for p in u.params if p.trainable)
    optimizer = op_seconds(Op("AdamW + gradient clipping", "memory", bytes=40 * local_trainable,
                              kernels=KERNELS["optimizer"]), rates)
    gpu_phases = [
        Phase("preprocess on the device", k * data, "frame and pixel bytes / memory rate"),
        Phase("encoders (forward, no_grad)", k * encoders, "encoder FLOPs (flops.encoder_flop_parts) / GEMM and "
                                                          "attention rates; elementwise bytes / memory rate"),
        Phase("visual path (pooling, projection + fusion, fwd + bwd)", k * visual, "pooled shapes / rates"),
        Phase("LLM forward", k * (sum(forward) + _seconds([embed], rates) / 2 + loss),
              f"layer FLOPs and bytes / rates; {w.loss} loss" + (" on the supervised rows" if w.loss == "fused"
                                                                   else "")),
        Phase("LLM backward" + (f" (with {w.checkpointing} recompute)" if w.checkpointing != "off" else ""),
              k * (sum(backward) + _seconds([embed], rates) / 2), "BACKWARD_FACTOR x forward (+ recompute)"),
        Phase("FSDP2 collectives, exposed", exposed,
              f"ring model over {group} ranks; layer collectives hidden behind their layer's compute"),
        Phase("step bookkeeping all-reduces (counts, loss, grad norm)", bookkeeping,
              "3 small all-reduces, tree: 2 x log2(ranks) hop latencies each"),
        Phase("optimizer (AdamW, clipping)", optimizer, "40 bytes per local trainable parameter / memory rate"),
    ]
    busy = sum(p.seconds for p in gpu_phases)
    frames = k * w.micro_batch * s.frames_sampled
    workers = min(float(w.num_workers), rates.cpu_cores_per_gpu.value)
    decode = frames / rates.decode_frames_s_per_core.value / max(1.0, workers)
    exposed_decode = decode if w.num_workers == 0 else max(0.0, decode - busy)  # 0 workers: in the main process
    gpu_phases.append(Phase("decode, exposed (DataLoader workers beside the GPU)", exposed_decode,
                            f"{frames} frames / {rates.decode_frames_s_per_core.name} / {max(1.0, workers):g} "
                            f"workers = {decode:.3f} s, overlapped with the step"))
    step = sum(p.seconds for p in gpu_phases)
    samples = k * w.micro_batch * w.world
    per_sample = float(sample_flops(s.config, round(w.text_tokens)).total)
    return TimePlan(phases=gpu_phases, step_s=step, comm_s=total_comm + bookkeeping,
                    exposed_comm_s=exposed + bookkeeping, samples_per_s=samples / step,
                    tokens_per_s=samples * seq / step,
                    mfu=per_sample * samples / step / (w.world * rates.peak_flops.value),
                    model_flops_per_sample=per_sample)
