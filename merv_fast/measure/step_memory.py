"""The peak memory of each phase of one training step (`merv_fast.train.step.Stepper.step`), as the allocator saw it:
what `merv-fast plan`'s memory model is checked against.

CUDA: `torch.cuda.max_memory_allocated`, reset at each phase's start, less what was allocated when the step began.
CPU: torch's CPU allocator reports every allocation and free, with its running total, to the profiler when
`profile_memory=True` (c10's ProfiledCPUMemoryReporter). It counts only the blocks allocated while profiling, so the
running total is exactly the bytes of tensors the step allocated and still holds; each phase's peak is the largest
total inside its `record_function` range. Tensors that existed before the step (parameters, optimizer state, the
batch) are not in it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from merv_fast.train.phases import PhaseTimer

PREFIX = "step_memory:"


class PhaseMemory(PhaseTimer):
    """A PhaseTimer (the Stepper's `timer`) that also marks each phase for the memory measurement."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.device = device
        self.cuda_peaks: dict[str, int] = defaultdict(int)
        self.base = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        with super().phase(name), record_function(PREFIX + name):
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            yield
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - self.base
                self.cuda_peaks[name] = max(self.cuda_peaks[name], peak)


def _cpu_peaks(trace: dict) -> dict[str, int]:
    events = trace["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    peaks: dict[str, int] = defaultdict(int)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or not name.startswith(PREFIX):
            continue
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        inside = [total for ts, total in memory if start <= ts <= end]
        if inside:
            peaks[name[len(PREFIX):]] = max(peaks[name[len(PREFIX):]], max(inside))
    return dict(peaks)


def step_phase_peaks(stepper, micro_batches) -> dict[str, int]:
    """Run `stepper.step(micro_batches)` once and return, per phase, the peak bytes of tensors allocated during the
    step (phases: data, encoders, llm_forward, backward, optimizer, comm)."""
    timer = PhaseMemory(stepper.device)
    stepper.timer = timer
    if timer.cuda:
        torch.cuda.synchronize(stepper.device)
        timer.base = torch.cuda.memory_allocated(stepper.device)
        stepper.step(micro_batches)
        return dict(timer.cuda_peaks)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper.step(micro_batches)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return _cpu_peaks(json.loads(path.read_text()))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard's storage, FSDP2's padded
    chunk included)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, encoders: torch.nn.Module) -> dict[str, int]:
    """What this rank holds of the trainable module (parameters, their gradients: call after a backward), of the
    optimizer's state, and of the frozen encoders, in bytes of allocated storage."""
    params = list(module.parameters())
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"parameters": _storage_bytes(params),
            "gradients": _storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _storage_bytes(states),
            "encoders": _storage_bytes(encoders.parameters())}
