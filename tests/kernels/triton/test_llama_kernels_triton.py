"""The fused Llama-layer kernels (kernels/rms_norm.py, swiglu.py, rope.py) against transformers' own modules, and a
tiny Llama with `llm.fused_layer_kernels` against the same model without.

Fresh random values every run (replay with MERV_TEST_SEED=<seed>, named in every failure). Output buffers start as
NaN, so an element a kernel never writes fails. Odd shapes on purpose: widths 17..300, row counts that are not powers
of two, head_dim 8/64/128 with grouped KV heads, position ids that restart per packed sample. Each reference runs in
the kernel's dtype (the roundings of transformers' computation are part of what is compared).
"""

import os

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaConfig,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

import merv_fast
from merv_fast.kernels.dispatch import use_backend
from merv_fast.kernels.rms_norm import rms_norm, rms_norm_backward_triton, rms_norm_triton
from merv_fast.kernels.rope import apply_rotary, rotate_triton
from merv_fast.kernels.swiglu import swiglu, swiglu_backward_triton, swiglu_triton
from merv_fast.model.llama_kernels import FusedLlamaMLP, FusedLlamaRMSNorm, FusedRopeLlamaAttention

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16"])


@pytest.fixture
def seeded():
    seed = int(os.environ.get("MERV_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    return torch.Generator().manual_seed(seed), seed


def draw(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def relative_error(got, want):
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm().clamp_min(1e-300)).item()


def nan_like(t, shape=None, dtype=None):
    return torch.full(shape or t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def leaf(t):
    return t.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------------- RMSNorm
@DTYPES
@pytest.mark.parametrize("shape", [(5, 3, 17), (33, 300), (2, 7, 128), (1, 64), (3, 37, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_llama_rmsnorm(shape, dtype, device, seeded):
    gen, seed = seeded
    width = shape[-1]
    module = LlamaRMSNorm(width, eps=1e-5).to(dtype).to(device)
    with torch.no_grad():
        module.weight.copy_(draw(gen, width, scale=0.5) + 1)
    x = draw(gen, *shape, dtype=dtype, device=device, scale=3.0)
    grad_y = draw(gen, *shape, dtype=dtype, device=device)
    x_ref = leaf(x)
    want = module(x_ref)
    want.backward(grad_y)

    rows = x.numel() // width
    y, rstd = rms_norm_triton(x, module.weight.detach(), 1e-5, out=nan_like(x),
                              rstd_out=nan_like(x, (rows,), torch.float32))
    grad_x, grad_w = rms_norm_backward_triton(grad_y, x, module.weight.detach(), rstd, grad_x_out=nan_like(x))
    assert y.dtype == dtype and grad_x.dtype == dtype and grad_w.dtype == dtype, f"seed {seed}"
    for name, got in (("y", y), ("rstd", rstd), ("grad_x", grad_x), ("grad_w", grad_w)):
        assert torch.isfinite(got).all(), f"seed {seed}: {name} not fully written"
    assert relative_error(y, want) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(grad_x, x_ref.grad) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(grad_w, module.weight.grad) < TOLERANCE[dtype], f"seed {seed}"

    # The public op's autograd gives the same gradients as the launchers.
    x_ours, w_ours = leaf(x), leaf(module.weight)
    with use_backend("triton"):
        rms_norm(x_ours, w_ours, 1e-5).backward(grad_y)
    assert torch.equal(x_ours.grad, grad_x) and torch.equal(w_ours.grad, grad_w), f"seed {seed}"


def test_rms_norm_half_input_with_fp32_weight(device, seeded):
    """An fp32 weight on fp16 activations: the module's output is fp32 (weight * normed-in-fp16), and so is ours."""
    gen, seed = seeded
    module = LlamaRMSNorm(45, eps=1e-6).to(device)
    with torch.no_grad():
        module.weight.copy_(draw(gen, 45) + 1)
    x = draw(gen, 11, 45, dtype=torch.float16, device=device)
    with use_backend("triton"):
        got = rms_norm(x, module.weight, 1e-6)
    want = module(x)
    assert got.dtype == want.dtype == torch.float32, f"seed {seed}"
    assert relative_error(got, want) < 1e-5, f"seed {seed}"


# ----------------------------------------------------------------------------------------------------- SwiGLU
@DTYPES
@pytest.mark.parametrize("shape", [(3, 7, 301), (1, 17), (2, 5, 176)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_llama_mlp_activation(shape, dtype, device, seeded):
    gen, seed = seeded
    act = ACT2FN["silu"]  # what LlamaMLP applies to gate_proj(x)
    gate, up = draw(gen, *shape, dtype=dtype, device=device, scale=3.0), draw(gen, *shape, dtype=dtype, device=device)
    grad_out = draw(gen, *shape, dtype=dtype, device=device)
    gate_ref, up_ref = leaf(gate), leaf(up)
    want = act(gate_ref) * up_ref
    want.backward(grad_out)

    out = swiglu_triton(gate, up, out=nan_like(gate))
    grad_gate, grad_up = swiglu_backward_triton(grad_out, gate, up, grad_gate_out=nan_like(gate),
                                                grad_up_out=nan_like(up))
    for name, got in (("out", out), ("grad_gate", grad_gate), ("grad_up", grad_up)):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"seed {seed}: {name} not fully written"
    assert relative_error(out, want) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(grad_gate, gate_ref.grad) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(grad_up, up_ref.grad) < TOLERANCE[dtype], f"seed {seed}"

    gate_ours, up_ours = leaf(gate), leaf(up)
    with use_backend("triton"):
        swiglu(gate_ours, up_ours).backward(grad_out)
    assert torch.equal(gate_ours.grad, grad_gate) and torch.equal(up_ours.grad, grad_up), f"seed {seed}"


# ----------------------------------------------------------------------------------------------------- RoPE
def packed_positions(lengths, batch):
    """Position ids of rows that each hold several samples: 0, 1, ... restarting at every sample."""
    return torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1)


def rope_inputs(gen, dtype, device, head_dim, heads=4, kv_heads=2, lengths=(20, 1, 16), batch=2):
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      rope_theta=10000.0)
    seq = sum(lengths)
    # as LlamaAttention makes them: [B, S, H, D] projections viewed as [B, H, S, D]
    q = draw(gen, batch, seq, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    k = draw(gen, batch, seq, kv_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    positions = packed_positions(lengths, batch).to(device) + 3 * torch.arange(batch, device=device)[:, None]
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(q, positions)
    return q, k, cos, sin


@DTYPES
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_rope_matches_apply_rotary_pos_emb(head_dim, dtype, device, seeded):
    gen, seed = seeded
    q, k, cos, sin = rope_inputs(gen, dtype, device, head_dim)
    grad_q, grad_k = draw(gen, *q.shape, dtype=dtype, device=device), draw(gen, *k.shape, dtype=dtype, device=device)
    q_ref, k_ref = leaf(q), leaf(k)
    want_q, want_k = apply_rotary_pos_emb(q_ref, k_ref, cos, sin)
    torch.autograd.backward((want_q, want_k), (grad_q, grad_k))

    got_q, got_k = rotate_triton(q, cos, sin, out=nan_like(q)), rotate_triton(k, cos, sin, out=nan_like(k))
    back_q = rotate_triton(grad_q, cos, sin, backward=True, out=nan_like(q))
    back_k = rotate_triton(grad_k, cos, sin, backward=True, out=nan_like(k))
    for name, got in (("q", got_q), ("k", got_k), ("grad_q", back_q), ("grad_k", back_k)):
        assert torch.isfinite(got).all(), f"seed {seed}: {name} not fully written"
    assert relative_error(got_q, want_q) < TOLERANCE[dtype] and relative_error(got_k, want_k) < TOLERANCE[dtype], \
        f"seed {seed}"
    assert relative_error(back_q, q_ref.grad) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(back_k, k_ref.grad) < TOLERANCE[dtype], f"seed {seed}"

    q_ours, k_ours = leaf(q), leaf(k)
    with use_backend("triton"):
        out_q, out_k = apply_rotary(q_ours, k_ours, cos, sin)
    assert out_q.stride() == want_q.stride(), f"seed {seed}: the result's layout differs from the reference's"
    torch.autograd.backward((out_q, out_k), (grad_q, grad_k))
    assert torch.equal(q_ours.grad, back_q) and torch.equal(k_ours.grad, back_k), f"seed {seed}"


@DTYPES
def test_rope_with_tables_whose_halves_differ(dtype, device, seeded):
    """Llama's cos/sin repeat their first half; apply_rotary_pos_emb does not rely on it, and neither may we."""
    gen, seed = seeded
    q, k, cos, _ = rope_inputs(gen, dtype, device, 16)
    cos, sin = draw(gen, *cos.shape, dtype=dtype, device=device), draw(gen, *cos.shape, dtype=dtype, device=device)
    grad_q = draw(gen, *q.shape, dtype=dtype, device=device)
    q_ref = leaf(q)
    want_q, want_k = apply_rotary_pos_emb(q_ref, k, cos, sin)
    want_q.backward(grad_q)
    q_ours = leaf(q)
    with use_backend("triton"):
        got_q, got_k = apply_rotary(q_ours, k, cos, sin)
    got_q.backward(grad_q)
    assert relative_error(got_q, want_q) < TOLERANCE[dtype] and relative_error(got_k, want_k) < TOLERANCE[dtype], \
        f"seed {seed}"
    assert relative_error(q_ours.grad, q_ref.grad) < TOLERANCE[dtype], f"seed {seed}"


def test_rope_half_queries_with_fp32_tables_promote_as_the_reference(device, seeded):
    """Under autocast with fp32 hidden states the tables are fp32 and q/k half: the reference's result is fp32,
    and the gradients reaching q/k are in their own dtype."""
    gen, seed = seeded
    q, k, cos, sin = rope_inputs(gen, torch.float32, device, 64)
    q, k = q.half(), k.half()
    q_ref, q_ours = leaf(q), leaf(q)
    want_q, _ = apply_rotary_pos_emb(q_ref, k, cos, sin)
    with use_backend("triton"):
        got_q, got_k = apply_rotary(q_ours, k, cos, sin)
    assert got_q.dtype == want_q.dtype == torch.float32 and got_k.dtype == torch.float32
    grad = draw(gen, *q.shape, device=device)
    want_q.backward(grad)
    got_q.backward(grad)
    assert q_ours.grad.dtype == torch.float16
    assert relative_error(got_q, want_q) < 1e-6 and relative_error(q_ours.grad, q_ref.grad) < 2e-3, f"seed {seed}"


def test_bfloat16_load_and_store_paths(device, seeded):
    """The interpreter has no bf16 arithmetic, so bf16 is only loaded, widened to fp32 and stored here; each kernel
    computes in fp32, so the same test is the whole check on a GPU."""
    gen, seed = seeded
    bf16 = torch.bfloat16
    module = LlamaRMSNorm(96, eps=1e-5).to(bf16).to(device)
    x = draw(gen, 13, 96, dtype=bf16, device=device)
    gate, up = draw(gen, 9, 40, dtype=bf16, device=device), draw(gen, 9, 40, dtype=bf16, device=device)
    q, k, cos, sin = rope_inputs(gen, bf16, device, 64)
    with use_backend("triton"):
        got = [rms_norm(x, module.weight, 1e-5), swiglu(gate, up), *apply_rotary(q, k, cos, sin)]
    want = [module(x), ACT2FN["silu"](gate) * up, *apply_rotary_pos_emb(q, k, cos, sin)]
    for g, w in zip(got, want):
        assert g.dtype == bf16 and torch.isfinite(g).all(), f"seed {seed}"
        assert relative_error(g, w) < 1e-2, f"seed {seed}"


def test_rope_broadcasts_one_cos_sin_row_over_the_batch(device, seeded):
    """position_ids [1, S] give cos/sin [1, S, D], shared by every sample (as transformers broadcasts them)."""
    gen, seed = seeded
    q, k, _, _ = rope_inputs(gen, torch.float32, device, 64, batch=3)
    cfg = LlamaConfig(hidden_size=4 * 64, num_attention_heads=4, num_key_value_heads=2)
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(q, packed_positions((30, 7), 1).to(device))
    with use_backend("triton"):
        got = apply_rotary(q, k, cos, sin)
    for g, w in zip(got, apply_rotary_pos_emb(q, k, cos, sin)):
        assert relative_error(g, w) < 1e-6, f"seed {seed}"


# ----------------------------------------------------------------------------------------------------- tiny Llama
def test_tiny_llama_with_fused_layer_kernels_matches_without(device, seeded):
    """`llm.fused_layer_kernels=true` against the same weights without it, on rows of packed samples (position ids
    restarting): the loss and every parameter's gradient agree, and no parameter name changes."""
    gen, seed = seeded
    torch.manual_seed(seed)
    plain = merv_fast.build_model("tiny").llm.to(device)
    fused = merv_fast.build_model("tiny", **{"llm.fused_layer_kernels": True}).llm.to(device)
    fused.load_state_dict(plain.state_dict())
    assert list(fused.state_dict()) == list(plain.state_dict())
    swapped = {type(m) for m in fused.modules()} - {type(m) for m in plain.modules()}
    assert swapped == {FusedLlamaRMSNorm, FusedLlamaMLP, FusedRopeLlamaAttention}

    batch, lengths = 2, (23, 1, 17)
    input_ids = torch.randint(3, fused.config.vocab_size - 1, (batch, sum(lengths)), generator=gen).to(device)
    positions = packed_positions(lengths, batch).to(device)
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        with use_backend("triton"):
            out = model(input_ids=input_ids, position_ids=positions, labels=input_ids)
            out.loss.backward()
        losses[name] = out.loss.detach()
    assert relative_error(losses["fused"], losses["plain"]) < 1e-6, f"seed {seed}"
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert relative_error(p.grad, grads[name].grad) < 1e-5, f"seed {seed}: {name}"


def test_compiled_ops_launch_the_kernels_without_graph_breaks(device, seeded):
    """Under torch.compile each op is its custom op (fullgraph: no break), and the kernels give what they give
    eagerly, gradients included."""
    gen, seed = seeded
    torch._dynamo.reset()
    x, weight = draw(gen, 2, 9, 40, device=device), draw(gen, 40, device=device)
    gate, up = draw(gen, 2, 9, 72, device=device), draw(gen, 2, 9, 72, device=device)
    q, k, cos, sin = rope_inputs(gen, torch.float32, device, 8, lengths=(5, 4))

    def layer(x, weight, gate, up, q, k):
        return (rms_norm(x, weight, 1e-5), swiglu(gate, up), *apply_rotary(q, k, cos, sin))

    inputs = (x, weight, gate, up, q, k)
    results = []
    with use_backend("triton"):
        for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
            leaves = [leaf(t) for t in inputs]
            outputs = fn(*leaves)
            grads = torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs])
            results.append([*outputs, *grads])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled), f"seed {seed}"
