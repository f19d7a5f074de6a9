"""What the planner knows about hardware: a table of GPUs, a table of interconnects, the cluster a run is planned
for, and the rates the step-time model divides by, each with where it came from.

Every number is a named constant whose source is stated beside it (a datasheet, or "assumption" with the reason).
A measured ceiling overrides the table: the GPU suite's `ceilings` area measures a bf16 8192^3 matmul and a large
device copy (merv_fast/measure/ceilings.py) into every results file, and `resolve_rates` takes those of the newest
results file measured on the planned GPU (or the files given with --results).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from merv_fast.measure.ceilings import bytes_s_ceiling, flop_s_ceiling
from merv_fast.measure.results import ResultsFile

GB = 1e9


@dataclass(frozen=True)
class Figure:
    """One number the model uses, its name, and where it came from (a constant's source or a results file)."""

    name: str
    value: float
    source: str

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as its datasheet gives it. Bandwidths are per direction."""

    peak_bf16_flops: float  # dense (no sparsity) bf16 tensor-core FLOP/s
    memory_bytes: float  # device memory as the datasheet states it (decimal GB)
    memory_bytes_s: float  # device-memory bandwidth
    intra_node_bytes_s: float  # GPU-to-GPU inside a node (NVLink, or PCIe where there is none)
    host_cores_per_node: int  # CPU cores of the reference server (DataLoader workers decode on them)
    source: str


# Datasheet figures. Dense bf16 is half the "with sparsity" figure NVIDIA prints; NVLink's "900 GB/s" is both
# directions together, so 450 GB/s each way.
DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec(989.4e12, 80 * GB, 3.35e12, 450 * GB, 112,
                       "NVIDIA H100 SXM5 datasheet (bf16 1979 TFLOP/s with sparsity, 80 GB HBM3 at 3.35 TB/s, "
                       "NVLink 4 900 GB/s); DGX H100 host: 2x Xeon Platinum 8480C, 112 cores"),
    "h200": DeviceSpec(989.4e12, 141 * GB, 4.8e12, 450 * GB, 112,
                       "NVIDIA H200 SXM datasheet (bf16 1979 TFLOP/s with sparsity, 141 GB HBM3e at 4.8 TB/s, "
                       "NVLink 4 900 GB/s); DGX H200 host: 2x Xeon Platinum 8480C, 112 cores"),
    "a100": DeviceSpec(312e12, 80 * GB, 2.039e12, 300 * GB, 128,
                       "NVIDIA A100 SXM4 80GB datasheet (bf16 312 TFLOP/s dense, 2039 GB/s HBM2e, NVLink 3 "
                       "600 GB/s); DGX A100 host: 2x AMD EPYC 7742, 128 cores"),
    "l40s": DeviceSpec(362.05e12, 48 * GB, 864 * GB, 32 * GB, 64,
                       "NVIDIA L40S datasheet (bf16 362.05 TFLOP/s dense, 48 GB GDDR6 at 864 GB/s, no NVLink: PCIe "
                       "Gen4 x16 64 GB/s both ways); host cores: assumption, a 2-socket 32-core server"),
}


@dataclass(frozen=True)
class LinkSpec:
    """The network between nodes. `per_gpu`: one NIC per GPU (rail-optimised, as DGX nodes are built), else one per
    node shared by its GPUs."""

    bytes_s: float  # one NIC, one direction
    per_gpu: bool
    source: str


LINKS: dict[str, LinkSpec] = {
    "nvlink": LinkSpec(0.0, True, "one NVLink domain across nodes (NVLink Switch System): the GPU's own NVLink "
                                  "bandwidth from the device table"),
    "ib-400": LinkSpec(50 * GB, True, "InfiniBand NDR 400 Gb/s, one ConnectX-7 per GPU (DGX H100/H200)"),
    "ib-200": LinkSpec(25 * GB, True, "InfiniBand HDR 200 Gb/s, one ConnectX-6 per GPU (DGX A100)"),
    "eth-100": LinkSpec(12.5 * GB, False, "100 Gb/s Ethernet, one NIC per node"),
}

# Shares of a datasheet figure that real kernels reach, used only when no results file measured the device.
MATMUL_SHARE = Figure("MATMUL_SHARE", 0.75, "assumption: cuBLAS bf16 GEMMs of training sizes reach about 3/4 of the "
                      "dense datasheet peak; the GPU suite's measured bf16_matmul_tflops replaces peak x share")
COPY_SHARE = Figure("COPY_SHARE", 0.85, "assumption: a device-to-device copy streams at about 85% of the datasheet "
                    "bandwidth; the GPU suite's measured copy_tb_s replaces it")
# FlashAttention runs below the GEMM rate (softmax, masking, the causal tail): FlashAttention-3's paper (Shah et al.
# 2024) shows FlashAttention-2 at 35-50% of H100 peak against cuBLAS at 70-80%.
ATTENTION_SHARE = Figure("ATTENTION_SHARE", 0.55, "assumption: attention kernels run at ~55% of the GEMM rate "
                         "(FlashAttention-2 on H100, FlashAttention-3 paper)")
LINK_EFFICIENCY = Figure("LINK_EFFICIENCY", 0.8, "assumption: NCCL all-gather / reduce-scatter bus bandwidth is "
                         "~80% of the link's (nccl-tests on NVLink 4 and NDR)")
HOP_LATENCY_INTRA_S = Figure("HOP_LATENCY_INTRA_S", 2e-6, "assumption: one NVLink ring step, NCCL simple protocol")
HOP_LATENCY_INTER_S = Figure("HOP_LATENCY_INTER_S", 6e-6, "assumption: one network ring step (IB/RoCE, NCCL)")
# A GPU kernel takes at least its launch: in eager mode a layer of many small kernels is launch-bound.
GPU_OP_FLOOR_S = Figure("GPU_OP_FLOOR_S", 5e-6, "assumption: eager-mode kernel launch, ~5 us per op")
CPU_OP_FLOOR_S = Figure("CPU_OP_FLOOR_S", 20e-6, "assumption: eager-mode op dispatch on a CPU, ~20 us per op")
# Memory the device has that tensors cannot use: CUDA context, cuBLAS/NCCL workspaces and buffers.
RUNTIME_RESERVED_BYTES = Figure("RUNTIME_RESERVED_BYTES", 3 * GB, "assumption: CUDA context (~0.5 GB), cuBLAS "
                                "workspaces and NCCL buffers (~1-2 GB) outside PyTorch's allocator")
# PyTorch's caching allocator holds more than the live tensors (block rounding, fragmentation between sizes).
ALLOCATOR_HEADROOM = Figure("ALLOCATOR_HEADROOM", 0.10, "assumption: the caching allocator reserves ~10% above the "
                            "peak of live tensors (fragmentation); expandable segments shrink it")
# Decoding when no results file measured it: the committed CPU data area measured 254.8 frames/s per core.
DECODE_FRAMES_S_PER_CORE = Figure("DECODE_FRAMES_S_PER_CORE", 254.76,
                                  "bench/results/2026-12-01_cpu-2core_data-full.json, decode+preprocess "
                                  "cpu-decode(pyav)+native (2-core Xeon) of the synthetic clips (at most 321x239): "
                                  "larger videos decode slower")


@dataclass
class Cluster:
    """Where a run is planned: `nodes` x `gpus_per_node` GPUs of one kind, nodes joined by `interconnect`."""

    gpu: str = "h100"
    gpus_per_node: int = 8
    nodes: int = 1
    interconnect: str = "ib-400"
    cpu_cores_per_node: int | None = None  # default: the device table's reference server

    def __post_init__(self):
        if self.gpu not in DEVICES and self.gpu != "cpu":
            raise ValueError(f"--gpu {self.gpu!r}: unknown; the device table has {sorted(DEVICES)} (and cpu, "
                             "from a results file's CPU ceilings)")
        if self.interconnect not in LINKS:
            raise ValueError(f"--interconnect {self.interconnect!r}: unknown; choose one of {sorted(LINKS)}")
        for key in ("gpus_per_node", "nodes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes,
                "interconnect": self.interconnect, "world": self.world}


# ----------------------------------------------------------------------------------------------- results files
def _read_results(path: Path) -> dict:
    try:
        data = ResultsFile.open(path).data
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"results file {str(path)!r}: cannot read it ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"results file {str(path)!r}: not a results file (no `results` list)")
    return data


def _slug_matches(path: Path, gpu: str) -> bool:
    """`2026-12-01_h100_gpu-suite.json` or `..._8xh100_...` for gpu h100; `..._cpu-2core_...` for cpu."""
    parts = path.name.split("_")
    if len(parts) < 3:
        return False
    slug = parts[1]
    return slug.startswith("cpu") if gpu == "cpu" else slug.split("x", 1)[-1].startswith(gpu)


def default_results_dir() -> Path | None:
    """bench/results of a source checkout (absent from an installed package: the tables' constants are used)."""
    from merv_fast.env import REPO_ROOT

    path = REPO_ROOT / "bench" / "results"
    return path if path.is_dir() else None


def measured_files(gpu: str, results: list[str | Path] | None) -> list[tuple[Path, dict]]:
    """The results files that speak for `gpu`: those given (all of them, newest name last), else those of
    bench/results whose device slug is the GPU's."""
    if results:
        return [(Path(p), _read_results(Path(p))) for p in results]
    directory = default_results_dir()
    if directory is None:
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        if path.name.endswith(".state.json") or not _slug_matches(path, gpu):
            continue
        try:
            found.append((path, _read_results(path)))
        except ValueError:
            continue
    return found


def _newest(files: list[tuple[Path, dict]], pick) -> tuple[Path, object] | None:
    for path, data in reversed(files):
        value = pick(data)
        if value is not None:
            return path, value
    return None


def _decode_rate(data: dict) -> float | None:
    """The best decode+preprocess rate a data area measured, frames per second per CPU core."""
    rates = [r.get("config", {}).get("frames_per_s_per_core") for r in data["results"] if r.get("area") == "data"]
    rates = [r for r in rates if isinstance(r, (int, float)) and r > 0]
    return max(rates) if rates else None


# ----------------------------------------------------------------------------------------------- rates
@dataclass(frozen=True)
class Rates:
    """What the step-time and memory models divide by, each a Figure (value + provenance)."""

    device: str
    matmul_flop_s: Figure
    attention_flop_s: Figure
    memory_bytes_s: Figure
    op_floor_s: Figure
    memory_bytes: Figure  # device capacity
    peak_flops: Figure  # the datasheet peak MFU divides by (the trainer's convention, merv_fast.model.flops)
    intra_bytes_s: Figure  # collective bus bandwidth inside a node
    inter_bytes_s: Figure  # collective bus bandwidth when a ring spans nodes
    nic_bytes_s: Figure  # what one GPU's share of the node's NICs carries (HSDP's cross-node rings, one per GPU)
    hop_latency_intra_s: Figure
    hop_latency_inter_s: Figure
    decode_frames_s_per_core: Figure
    cpu_cores_per_gpu: Figure
    runtime_reserved_bytes: Figure
    allocator_headroom: Figure

    def figures(self) -> dict[str, dict]:
        return {f.name: f.to_dict() for f in vars(self).values() if isinstance(f, Figure)}


def _cpu_rates(files: list[tuple[Path, dict]], ceilings: dict | None) -> tuple[Figure, Figure]:
    """A CPU 'device' has no datasheet here: its rates are the measured fp32 matmul and copy ceilings."""
    if ceilings:
        source = "this run's ceilings"
        flops, copy = flop_s_ceiling(ceilings), bytes_s_ceiling(ceilings)
    else:
        hit = _newest(files, lambda d: d.get("ceilings") if flop_s_ceiling(d.get("ceilings") or {}) else None)
        if hit is None:
            raise ValueError("--gpu cpu needs a results file with CPU ceilings (fp32_matmul_gflops, copy_gb_s); "
                             "give one with --results")
        source = f"{hit[0].name} ceilings"
        flops, copy = flop_s_ceiling(hit[1]), bytes_s_ceiling(hit[1])
    return (Figure("cpu.matmul_flop_s", flops, f"{source}: fp32_matmul_gflops"),
            Figure("cpu.memory_bytes_s", copy, f"{source}: copy_gb_s"))


def _measured_or(estimate: Figure, key: str, rate, ceilings: dict | None, files: list[tuple[Path, dict]]) -> Figure:
    """`estimate`'s figure as measured: `rate(ceilings)` from the calling run's ceiling `key`, else from the newest
    results file that has it; `estimate` itself where nothing measured it."""
    if ceilings and rate(ceilings):
        return Figure(estimate.name, rate(ceilings), f"this run's {key} ceiling")
    hit = _newest(files, lambda d: rate(d.get("ceilings") or {}) if key in (d.get("ceilings") or {}) else None)
    return Figure(estimate.name, hit[1], f"{hit[0].name}: ceilings.{key}") if hit else estimate


def resolve_rates(cluster: Cluster, results: list[str | Path] | None = None,
                  ceilings: dict | None = None) -> Rates:
    """The cluster's rates: measured ceilings (`ceilings` of the calling run, else the newest results file for the
    GPU) where there are any, the device table times its share otherwise."""
    files = measured_files(cluster.gpu, results)
    link = LINKS[cluster.interconnect]
    decode = _newest(files, _decode_rate)
    decode_fig = (Figure("decode_frames_s_per_core", decode[1], f"{decode[0].name}: best data-area "
                         "frames_per_s_per_core") if decode else DECODE_FRAMES_S_PER_CORE)
    if cluster.gpu == "cpu":
        matmul, copy = _cpu_rates(files, ceilings)
        cores = cluster.cpu_cores_per_node or len(os.sched_getaffinity(0))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        zero = Figure("cpu.no_collectives", 0.0, "one CPU process: no collectives")
        return Rates("cpu", matmul, Figure("cpu.attention_flop_s", matmul.value, matmul.source), copy,
                     CPU_OP_FLOOR_S, Figure("cpu.memory_bytes", memory, "this machine's physical memory"),
                     Figure("cpu.peak_flops", matmul.value, matmul.source), zero, zero, zero, zero, zero, decode_fig,
                     Figure("cpu_cores_per_gpu", cores, "this machine's cores"),
                     Figure("cpu.runtime_reserved_bytes", 0.0, "no device runtime on a CPU"),
                     Figure("cpu.allocator_headroom", 0.0, "the CPU allocator returns memory to the system"))

    spec = DEVICES[cluster.gpu]
    name = cluster.gpu
    peak = Figure(f"{name}.peak_bf16_flops", spec.peak_bf16_flops, spec.source)
    matmul = _measured_or(Figure(f"{name}.matmul_flop_s", spec.peak_bf16_flops * MATMUL_SHARE.value,
                                 f"{peak.name} x MATMUL_SHARE ({MATMUL_SHARE.source})"),
                          "bf16_matmul_tflops", flop_s_ceiling, ceilings, files)
    copy = _measured_or(Figure(f"{name}.memory_bytes_s", spec.memory_bytes_s * COPY_SHARE.value,
                               f"{name}.memory_bytes_s datasheet x COPY_SHARE ({spec.source})"),
                        "copy_tb_s", bytes_s_ceiling, ceilings, files)
    attention = Figure(f"{name}.attention_flop_s", matmul.value * ATTENTION_SHARE.value,
                       f"{matmul.name} x ATTENTION_SHARE ({ATTENTION_SHARE.source})")
    intra = Figure(f"{name}.intra_bytes_s", spec.intra_node_bytes_s * LINK_EFFICIENCY.value,
                   f"{name}.intra_node_bytes_s x LINK_EFFICIENCY ({spec.source})")
    # A ring that spans nodes: within each node it runs at the intra-node rate, across a node boundary at what the
    # node's NICs carry together (one per GPU, rail-optimised, or one per node): the slower of the two binds.
    nic = spec.intra_node_bytes_s if cluster.interconnect == "nvlink" else link.bytes_s
    node_out = nic * (cluster.gpus_per_node if link.per_gpu else 1)
    inter = Figure(f"{cluster.interconnect}.inter_bytes_s",
                   min(spec.intra_node_bytes_s, node_out) * LINK_EFFICIENCY.value,
                   f"min(intra-node, {'one NIC per GPU' if link.per_gpu else 'one NIC per node'} x NIC) x "
                   f"LINK_EFFICIENCY ({link.source})")
    nic_share = Figure(f"{cluster.interconnect}.nic_bytes_s_per_gpu",
                       node_out / cluster.gpus_per_node * LINK_EFFICIENCY.value,
                       f"the node's NICs / GPUs per node x LINK_EFFICIENCY ({link.source})")
    cores = cluster.cpu_cores_per_node or spec.host_cores_per_node
    cores_fig = Figure("cpu_cores_per_gpu", cores / cluster.gpus_per_node,
                       "--cpu-cores-per-node" if cluster.cpu_cores_per_node else f"{name} reference server cores "
                       f"/ GPUs per node ({spec.source})")
    return Rates(name, matmul, attention, copy, GPU_OP_FLOOR_S, Figure(f"{name}.memory_bytes", spec.memory_bytes,
                                                                     spec.source),
                 peak, intra, inter, nic_share, HOP_LATENCY_INTRA_S, HOP_LATENCY_INTER_S, decode_fig, cores_fig,
                 RUNTIME_RESERVED_BYTES, ALLOCATOR_HEADROOM)
