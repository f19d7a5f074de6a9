"""pytest-benchmark suite: one whole training step, MERV vs its single-encoder baseline, on the same clips (each
model sampling its own frame count).

The step is `merv-fast bench`'s (merv_fast.train.bench.StepRunner.step): preprocessing, frozen encoders, pooling +
projection + fusion, LLM forward with the loss, backward, clipped AdamW update.
CPU/CI: tiny vs single-tiny, run once as tests (`--benchmark-disable`). GPU: merv-1b vs single-1b, B=8, 128 text
tokens, activation checkpointing on (the bench's GPU defaults); the figure of record is the CUDA-event median in
`extra_info["cuda_median_ms"]`, batches rotated.
Measure: `python -m pytest bench/bench_train.py --benchmark-enable --benchmark-json out.json`.
"""


import pytest
import torch

from merv_fast.config import BASELINE_OF, get_preset
from merv_fast.data.synthetic import synthetic_batches
from merv_fast.measure.pytest_bench import record
from merv_fast.train.bench import BenchSettings, StepRunner

CUDA = torch.cuda.is_available()
PRESET = "merv-1b" if CUDA else "tiny"
TEXT_TOKENS = 128 if CUDA else 16


@pytest.mark.parametrize("model", ["merv", "baseline"])
def test_train_step(benchmark, model):
    settings = BenchSettings(preset=PRESET, text_tokens=TEXT_TOKENS).resolve()
    preset = PRESET if model == "merv" else BASELINE_OF[PRESET]
    # the same synthetic clips for both models, each sampling its own frame count as the release does (a 16-frame
    # single encoder: 16 frames over the clip, not every second of MERV's 32)
    batches = synthetic_batches(get_preset(preset), settings.batch_size, TEXT_TOKENS, count=2, seed=0)
    runner = StepRunner(preset, settings)
    assert torch.isfinite(runner.step(batches[0]))
    benchmark.extra_info.update(preset=preset, batch_size=settings.batch_size, text_tokens=TEXT_TOKENS,
                                activation_checkpointing=settings.activation_checkpointing)
    record(benchmark, runner.step, [(b,) for b in batches], warmup=2, iters=10)
