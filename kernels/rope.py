"""Llama's rotary position embedding of queries and keys as one fused op: a Triton kernel for forward and backward,
and the torch reference beside it.

The reference is transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (rotate_half convention, cos/sin broadcast over
heads): x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for the halves x1, x2 of the head dimension.
cos and sin are the ones `LlamaRotaryEmbedding` computed from the position ids, so positions that restart per packed
sample need nothing here: each token's cos/sin row already carries its own position. The kernel reads x, cos and sin
once (cos/sin once per block of tokens, for every head), computes in fp32 and rounds once, where the reference rounds
each of its three elementwise ops. The map is linear in x and orthogonal per pair (x1, x2), so the backward is the
same kernel with the rotation reversed: d_x1 = g1 cos1 + g2 sin2, d_x2 = g2 cos2 - g1 sin1. cos and sin get no
gradient (they come from a buffer of inverse frequencies, never trained).

`apply_rotary` is the entry point: in eager mode the reference where `resolve_backend` says torch, else the custom op
`merv_fast::rope`; under torch.compile always the custom op, which picks Triton or the same algebra in torch when it
runs (as kernels/rms_norm.py). Triton is imported only when the kernel is first launched.
"""

from __future__ import annotations

import functools

import torch

from .aot import launch
from .dispatch import interpreter_enabled, resolve_backend


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1: q [B, H, S, D], k [B, H_kv, S, D], cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel (body compiled on first launch, `tl` bound then). One program per (block of BLOCK_S tokens, sample,
# run of heads): it loads the tokens' cos/sin halves once and rotates every head of the run with them.
# ---------------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _triton_kernel()


def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr,
                 stride_xb, stride_xh, stride_xs, stride_xd,
                 stride_cb, stride_cs, stride_cd,
                 stride_sb, stride_ss, stride_sd,
                 stride_ob, stride_oh, stride_os, stride_od,
                 H, S, HALF, heads_per_program,
                 BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1).to(tl.int64)
    first_head = tl.program_id(2) * heads_per_program
    d = tl.arange(0, BLOCK_D)
    mask = (s < S)[:, None] & (d < HALF)[None, :]
    s = s.to(tl.int64)

    c_lo = cos_ptr + b * stride_cb + s[:, None] * stride_cs + d[None, :] * stride_cd
    s_lo = sin_ptr + b * stride_sb + s[:, None] * stride_ss + d[None, :] * stride_sd
    cos1 = tl.load(c_lo, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(c_lo + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(s_lo, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(s_lo + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)

    x_tok = x_ptr + b * stride_xb + s[:, None] * stride_xs + d[None, :] * stride_xd
    o_tok = out_ptr + b * stride_ob + s[:, None] * stride_os + d[None, :] * stride_od
    for h in range(first_head, tl.minimum(first_head + heads_per_program, H)):
        x_lo = x_tok + h * stride_xh
        x1 = tl.load(x_lo, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_lo + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation
            out1 = x1 * cos1 + x2 * sin2
            out2 = x2 * cos2 - x1 * sin1
        else:
            out1 = x1 * cos1 - x2 * sin1
            out2 = x2 * cos2 + x1 * sin2
        o_lo = o_tok + h * stride_oh
        tl.store(o_lo, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_lo + HALF * stride_od, out2.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_rope_kernel)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [B, heads, S, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, _, seq, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} outside the head count")
    if dim % 2:
        raise ValueError(f"rope: head_dim {dim} must be even (rotate_half splits it in two)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1:] != (seq, dim):
            raise ValueError(f"rope: {name} {tuple(t.shape)} must be [B or 1, S, head_dim] = [{batch}, {seq}, {dim}]")


def rope_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """The reference's result dtype: x * cos promotes (bf16 q with fp32 tables, as under autocast, gives fp32)."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False,
                  dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, S, D] (any strides) rotated by cos/sin [B or 1, S, D]; the transposed rotation when `backward`.
    The result has x's layout (as the reference's elementwise ops give) and `dtype` (default: the reference's);
    `out` may be passed, poisoned in tests."""
    batch, heads, seq, dim = x.shape
    cos, sin = cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)
    if out is None:
        out = torch.empty_like(x, dtype=dtype or rope_dtype(x, cos, sin))
    if x.numel() == 0:
        return out
    half = dim // 2
    if interpreter_enabled():  # few, large programs: the interpreter pays per program
        block_s, heads_per_program, meta = min(_pow2_at_least(seq), 64), heads, {}
    else:
        block_s, heads_per_program, meta = 16, 4, {"num_warps": 4}
    grid = (-(-seq // block_s), batch, -(-heads // heads_per_program))
    launch(_triton_kernel(), grid, x, cos, sin, out, *x.stride(), *cos.stride(), *sin.stride(), *out.stride(),
                           heads, seq, half, heads_per_program,
                           BACKWARD=backward, BLOCK_S=block_s, BLOCK_D=_pow2_at_least(half), **meta)
    return out


def _rotate_back_torch(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The transposed rotation in torch: rotate_half's transpose maps [z1, z2] to [z2, -z1]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = grad.shape[-1] // 2
    z = grad * sin
    return (grad * cos + torch.cat((z[..., half:], -z[..., :half]), dim=-1)).to(dtype)


@torch.library.custom_op("merv_fast::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend(q, k, cos, sin) == "triton":
        return rotate_triton(q, cos, sin), rotate_triton(k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)


@_rope_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q, dtype=rope_dtype(q, cos, sin)), torch.empty_like(k, dtype=rope_dtype(k, cos, sin))


@torch.library.custom_op("merv_fast::rope_backward", mutates_args=())
def _rope_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous gradients on both paths: the layout the fake promises whatever layout autograd hands over.
    if resolve_backend(grad_q, grad_k, cos, sin) == "triton":
        return (rotate_triton(grad_q, cos, sin, backward=True, out=grad_q.new_empty(grad_q.shape, dtype=q_dtype)),
                rotate_triton(grad_k, cos, sin, backward=True, out=grad_k.new_empty(grad_k.shape, dtype=k_dtype)))
    return (_rotate_back_torch(grad_q, cos, sin, q_dtype).contiguous(),
            _rotate_back_torch(grad_k, cos, sin, k_dtype).contiguous())


@_rope_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, q_dtype, k_dtype):
    return grad_q.new_empty(grad_q.shape, dtype=q_dtype), grad_k.new_empty(grad_k.shape, dtype=k_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = (q.dtype, k.dtype)


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = _rope_backward_op(grad_q, grad_k, cos, sin, *ctx.dtypes)
    return grad_q, grad_k, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed) as transformers' apply_rotary_pos_emb(q, k, cos, sin): the fused kernel or the reference,
    as `resolve_backend(q, k)` decides."""
    _check(q, k, cos, sin)
    if not torch.compiler.is_compiling() and resolve_backend(q, k, cos, sin) == "torch":
        return apply_rotary_reference(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the fused kernel gives cos/sin no gradient, but they require one; run the torch "
                         "backend for trainable rotary tables")
    return _rope_op(q, k, cos, sin)


def aot_launches(model) -> None:
    """The launches the LLM's attention makes (kernels/aot.py records them on meta tensors): q and k as
    transformers lays them out ([B, S, heads, head_dim] projections viewed [B, heads, S, head_dim]), forward and the
    transposed rotation of their (contiguous) gradients."""
    head_dim = model.llm_hidden // model.llm_heads
    batch, seq = model.batch, model.sequence
    cos, sin = model.empty(batch, seq, head_dim), model.empty(batch, seq, head_dim)
    for heads in sorted({model.llm_heads, model.llm_kv_heads}):
        x = model.empty(batch, seq, heads, head_dim).transpose(1, 2)
        rotate_triton(x, cos, sin)
        rotate_triton(model.empty(batch, heads, seq, head_dim), cos, sin, backward=True, dtype=model.dtype)
