"""pytest-benchmark suite: the optional fused Llama-layer ops (RMSNorm, SwiGLU, RoPE) vs their torch references
(transformers' computations), forward and forward+backward.

"fused" is what `llm.fused_layer_kernels` swaps in (Triton on a GPU; on a CPU without TRITON_INTERPRET the dispatch
runs the reference, so there both sides compute the same thing). The cases are the GPU-suite area's
(merv_fast/measure/llama_kernel_areas.py): CPU/CI the tiny LLM in fp32, run once as tests (`--benchmark-disable`);
GPU merv-1b and merv-7b shapes in bf16, 8 x 1600 tokens, the CUDA-event median in `extra_info["cuda_median_ms"]`.
Every benchmark first checks, once and outside the timed region, that "fused" computes its reference's outputs
(and input gradients for the backward cases) on the same inputs, within the op's per-dtype tolerance.
Measure: `python -m pytest bench/bench_llama_kernels.py --benchmark-enable --benchmark-json out.json`.
"""

import pytest
import torch

from merv_fast.config import get_preset
from merv_fast.measure.llama_kernel_areas import SHAPES, op_cases, timed
from merv_fast.measure.pytest_bench import record

PRESETS, BATCH, TOKENS, DTYPE = SHAPES
# (rtol, atol): the kernels keep the reference's intermediate roundings in fp32; bf16 rounds once more at the end
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def outputs_and_grads(fn, inputs, grads, backward):
    outputs = fn(*inputs)
    if not backward:
        return [o.detach() for o in outputs]
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, inputs, grads))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_llama_kernel(benchmark, preset, op, impl, backward):
    [case] = [c for c in op_cases(get_preset(preset).llm, BATCH, TOKENS, DTYPE) if c.op == op]
    benchmark.extra_info.update(case.config, bytes=case.bytes_forward + (case.bytes_backward if backward else 0))
    inputs, grads = case.sets[0]
    got = outputs_and_grads(getattr(case, impl), inputs, grads, backward)
    want = outputs_and_grads(case.reference, inputs, grads, backward)
    rtol, atol = TOLERANCE[DTYPE]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{op} {impl} result {i}: {m}")
    record(benchmark, timed(getattr(case, impl), backward), case.sets)
