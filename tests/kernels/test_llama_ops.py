"""The fused Llama-layer ops' torch engines and their torch.compile path, on CPU: under torch.compile each public op
goes through its custom op with no graph break (fullgraph=True), and the custom op's torch engine (forward and the
hand-written backward) matches transformers' computation. The Triton kernels are tested in
tests/kernels/triton/test_llama_kernels_triton.py."""

import os

import pytest
import torch
from torch.func import functional_call
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaConfig,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from merv_fast.kernels.dispatch import use_backend
from merv_fast.kernels.rms_norm import rms_norm
from merv_fast.kernels.rope import apply_rotary
from merv_fast.kernels.swiglu import swiglu

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the torch engines' test")


def close(got, want, tol):
    return ((got.double() - want.double()).norm() / want.double().norm()).item() < tol


def grads_of(fn, inputs, grad_outputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return outputs, torch.autograd.grad(outputs, leaves, grad_outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_compiled_ops_run_their_torch_engines_like_transformers(dtype):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    tol = 1e-6 if dtype == torch.float32 else 2e-3

    norm = LlamaRMSNorm(37, eps=1e-5).to(dtype)
    cfg = LlamaConfig(hidden_size=4 * 16, num_attention_heads=4, num_key_value_heads=2)
    q, k = draw(2, 11, 4, 16).transpose(1, 2), draw(2, 11, 2, 16).transpose(1, 2)  # as LlamaAttention views them
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None].expand(2, -1)  # two packed samples per row
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions)
    cases = [  # (ours, transformers', inputs)
        (lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: functional_call(norm, {"weight": w}, (x,)),
         (draw(3, 5, 37), draw(37) + 1)),
        (swiglu, lambda g, u: ACT2FN["silu"](g) * u, (draw(4, 29), draw(4, 29))),
        (lambda q, k: apply_rotary(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), (q, k)),
    ]
    with use_backend("torch"):
        for ours, theirs, inputs in cases:
            with torch.no_grad():
                outputs = theirs(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            grad_outputs = tuple(draw(*o.shape) for o in outputs)
            want, want_grads = grads_of(theirs, inputs, grad_outputs)
            got, got_grads = grads_of(torch.compile(ours, backend="aot_eager", fullgraph=True), inputs, grad_outputs)
            for g, t in zip(got + got_grads, want + want_grads):
                assert g.dtype == t.dtype and g.shape == t.shape
                assert close(g, t, tol)
