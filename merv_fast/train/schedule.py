"""Learning-rate schedule: linear warmup over `ceil(warmup_ratio * total_steps)` steps, then cosine to 0, as the
release (HF Trainer: `get_warmup_steps` then `get_cosine_schedule_with_warmup`, num_cycles 0.5).

The schedule's length comes from the epochs (`steps_per_epoch * epochs`, rounded up, as HF's `max_steps`) or an
explicit total; `--max-steps` only stops a run early and never enters here.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def total_steps_for(steps_per_epoch: int, epochs: float, total_steps: int | None = None) -> int:
    """The schedule's length: `total_steps` when given, else ceil(epochs x optimizer steps per epoch)."""
    if total_steps is not None:
        return int(total_steps)
    return max(1, math.ceil(epochs * steps_per_epoch))


class CosineWithWarmup:
    """The multiplier at step `s` (a picklable object, so the scheduler's state_dict carries it)."""

    def __init__(self, warmup: int, total: int, num_cycles: float = 0.5):
        self.warmup, self.total, self.num_cycles = int(warmup), int(total), float(num_cycles)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        progress = float(step - self.warmup) / float(max(1, self.total - self.warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float = 0.03) -> torch.optim.lr_scheduler.LambdaLR:
    fn = CosineWithWarmup(warmup_steps(total_steps, warmup_ratio), total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
