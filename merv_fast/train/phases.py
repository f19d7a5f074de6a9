"""Per-phase wall time inside a training step: CUDA events on GPU (no host sync until the step ends),
perf_counter on CPU."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect (synchronises the GPU once)."""
        if self.cuda and self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._pending.clear()
        out, self.totals = dict(self.totals), defaultdict(float)
        return out
