"""pytest-benchmark suite: the LLM's training step (forward with the loss + backward) on stage-2-like micro-batches.

Parameters: padded + plain loss (the release's: batches of 8 grouped by length, padded to the longest, cross-entropy
on full fp32 logits), padded + fused, packed + plain, packed + fused (merv_fast/train/packing.py,
kernels/fused_linear_ce.py), each under every attention backend available here (merv_fast/model/attention.py). The
micro-batches and the step are the GPU-suite area's (merv_fast/measure/llm_areas.py): the preset's visual tokens
spliced after BOS plus text drawn from 50-600 tokens on a GPU (merv-1b's LLM, fp32 master weights under bf16
autocast), 5-60 tokens with the tiny LLM on a CPU (fp32; run once as tests in CI with `--benchmark-disable`).
extra_info: real tokens per step (never padding), tokens_per_s (from the CUDA-event median on a GPU, from
pytest-benchmark's median on a CPU when timing is enabled), peak memory of one step (CUDA only).
Measure: `python -m pytest bench/bench_llm.py --benchmark-enable`.
"""

import pytest
import torch

from merv_fast.measure.llm_areas import (DEVICE, MODES, available_backends, llm_config, llm_step, real_tokens,
                                         stage2_micro_batches)
from merv_fast.measure.pytest_bench import record
from merv_fast.measure.timing import peak_memory
from merv_fast.model.attention import install
from merv_fast.model.llm import build_llm

PRESET = "merv-1b" if DEVICE.type == "cuda" else "tiny"


@pytest.fixture(scope="module")
def workload():
    cfg = llm_config(PRESET)
    torch.manual_seed(0)
    with DEVICE:
        llm = build_llm(cfg.llm)
    llm.train()
    return cfg, llm, stage2_micro_batches(cfg, 2)


@pytest.mark.parametrize("attention", available_backends())
@pytest.mark.parametrize("mode", MODES)
def test_llm_step(benchmark, workload, mode, attention):
    cfg, llm, batches = workload
    install(llm, attention)
    step = llm_step(llm, cfg, mode)
    assert torch.isfinite(step(*batches[0]))
    tokens = sum(real_tokens(b) for b in batches) / len(batches)
    record(benchmark, step, batches, warmup=2, iters=6)
    stats = getattr(benchmark, "stats", None)
    seconds = benchmark.extra_info["cuda_median_ms"] / 1e3 if "cuda_median_ms" in benchmark.extra_info else \
        (stats.stats.median if stats is not None else None)
    benchmark.extra_info.update(preset=PRESET, real_tokens=tokens, peak_mem_bytes=peak_memory(step, *batches[0]),
                                tokens_per_s=tokens / seconds if seconds else None)
