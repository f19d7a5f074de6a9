"""Timing one callable the same way everywhere: warm up, time each call, report the median and its spread.

On CUDA each call sits between its own pair of CUDA events and the host synchronizes once, after the last call, so
the launches queue up as they would in real use and no per-call synchronization is measured. On CPU each call is
timed with time.perf_counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    iters: int
    spread: float  # (p80 - p20) / median: above ~0.1 the number is noisy and worth a second look
    peak_mem_bytes: int | None = None  # filled in by the caller from peak_memory(), when it measured that

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted sequence."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(times_ms: Sequence[float]) -> Timing:
    ordered = sorted(times_ms)
    median = percentile(ordered, 0.5)
    p20, p80 = percentile(ordered, 0.2), percentile(ordered, 0.8)
    return Timing(median_ms=median, p20_ms=p20, p80_ms=p80, min_ms=ordered[0], iters=len(ordered),
                  spread=(p80 - p20) / median if median > 0 else 0.0)


def _first_tensor_device(args_list: Sequence[tuple]) -> torch.device | None:
    for args in args_list:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                return arg.device
    return None


def pick_device(device: str | torch.device | None, args_list: Sequence[tuple] = ()) -> torch.device:
    """The device given, else that of the first tensor argument, else CUDA when there is one."""
    if device is not None:
        return torch.device(device)
    return _first_tensor_device(args_list) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure(fn: Callable[..., Any], *, warmup: int = 3, iters: int = 20, device: str | torch.device | None = None,
            rotate: list[tuple] | None = None) -> Timing:
    """Time `fn`. With `rotate`, call i gets `*rotate[i % len(rotate)]`: several input sets in turn, so that the
    timing does not flatter a kernel whose inputs sit warm in cache; without it `fn()` is called bare."""
    if iters < 1:
        raise ValueError("iters must be at least 1")
    args_list = list(rotate) if rotate else [()]
    device = pick_device(device, args_list)

    for i in range(warmup):
        fn(*args_list[i % len(args_list)])

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(*args_list[i % len(args_list)])
            ends[i].record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])

    times_ms = []
    for i in range(iters):
        args = args_list[i % len(args_list)]
        start = time.perf_counter()
        fn(*args)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return summarize(times_ms)


def peak_memory(fn: Callable[..., Any], *args: Any, device: str | torch.device | None = None) -> int | None:
    """Peak CUDA bytes allocated while `fn(*args)` runs once (from a reset peak); None on CPU, where torch
    keeps no such counter."""
    device = pick_device(device, [args])
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
