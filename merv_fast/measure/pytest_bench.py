"""The bench/ suites' shared convention: run under pytest-benchmark, and on a GPU also store the CUDA-event timing
(merv_fast.measure.timing.measure, inputs rotated) that is the figure of record, in the benchmark's `extra_info`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from merv_fast.measure.timing import measure


def record(benchmark, fn: Callable[..., Any], rotate: Sequence[tuple], *, warmup: int = 3, iters: int = 20) -> None:
    """Call `fn(*rotate[i % len(rotate)])` under `benchmark`; on CUDA add cuda_median_ms / cuda_p20_ms / cuda_p80_ms."""
    calls = itertools.count()
    benchmark(lambda: fn(*rotate[next(calls) % len(rotate)]))
    if torch.cuda.is_available():
        t = measure(fn, rotate=list(rotate), warmup=warmup, iters=iters)
        benchmark.extra_info.update(cuda_median_ms=t.median_ms, cuda_p20_ms=t.p20_ms, cuda_p80_ms=t.p80_ms)
