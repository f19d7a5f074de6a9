"""pytest-benchmark suite: the optional fused Llama-layer ops (RMSNorm, SwiGLU, RoPE) vs their torch references
(transformers' computations), forward and forward+backward.

"fused" is what `llm.fused_layer_kernels` swaps in (Triton on a GPU; on a CPU without TRITON_INTERPRET the dispatch
runs the reference, so there both sides compute the same thing). The cases are the GPU-suite area's
(merv_fast/measure/llama_kernel_areas.py): CPU/CI the tiny LLM in fp32, run once as tests (`--benchmark-disable`);
GPU merv-1b and merv-7b shapes in bf16, 8 x 1600 tokens, the CUDA-event median in `extra_info["cuda_median_ms"]`.
Measure: `python -m pytest bench/bench_llama_kernels.py --benchmark-enable --benchmark-json out.json`.
"""

import pytest

from merv_fast.config import get_preset
from merv_fast.measure.llama_kernel_areas import SHAPES, op_cases, timed
from merv_fast.measure.pytest_bench import record

PRESETS, BATCH, TOKENS, DTYPE = SHAPES


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_llama_kernel(benchmark, preset, op, impl, backward):
    [case] = [c for c in op_cases(get_preset(preset).llm, BATCH, TOKENS, DTYPE) if c.op == op]
    benchmark.extra_info.update(case.config, bytes=case.bytes_forward + (case.bytes_backward if backward else 0))
    record(benchmark, timed(getattr(case, impl), backward), case.sets)
