"""Projection of each encoder's pooled tokens to the LLM width, and the cross-attention fusion (spec section 4).

`project_fuse_reference` is the release's computation, step for step: every projector output P_e is materialised,
keys are the token means of P_e, one learnable query attends over the E keys (single head, scaled by
1/sqrt(embed_dim)), and the output is the softmax-weighted sum of the P_e. The value and output projections of the
release's `nn.MultiheadAttention` never influence the result and are not computed.

`project_fuse_concat` is the fused op on the concatenated layout the pooling op writes: one product over all
encoders' columns, each scaled by its fusion weight as the tiles load, no P_e forward or backward (the custom op
merv_fast::project_fuse, Triton kernels in project_fuse_triton.py, or the reference, as kernels/dispatch.py decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend


@dataclass
class FusionWeights:
    """The parameters that reach the output: query, its projection, and the key projection."""

    query: torch.Tensor  # [1, E]
    q_weight: torch.Tensor  # [E, E]
    q_bias: torch.Tensor  # [E]
    k_weight: torch.Tensor  # [E, D]
    k_bias: torch.Tensor  # [E]


def fusion_weights_from_logits(keys: torch.Tensor, fw: FusionWeights) -> torch.Tensor:
    """keys [B, E_enc, D] -> softmax weights [B, E_enc], one scalar per (sample, encoder)."""
    q = F.linear(fw.query, fw.q_weight, fw.q_bias)  # [1, E]
    k = F.linear(keys, fw.k_weight, fw.k_bias)  # [B, E_enc, E]
    logits = (k @ q.transpose(0, 1)).squeeze(-1) / math.sqrt(fw.query.shape[-1])
    return logits.softmax(dim=-1)


def project_fuse_reference(pooled: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor],
                           fusion: FusionWeights | None) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled[e] [B, L, C_e], weights[e] [D, C_e], biases[e] [D] -> (output [B, L, D], mix weights [B, E_enc]).

    With one encoder (the single-encoder baseline) the softmax over one key is exactly 1: the output is P_1.
    """
    projected = [F.linear(p, w, b) for p, w, b in zip(pooled, weights, biases)]
    if fusion is None:
        if len(projected) != 1:
            raise ValueError(f"{len(projected)} encoders need fusion weights")
        p = projected[0]
        return p, torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)
    stacked = torch.stack(projected, dim=1)  # [B, E_enc, L, D]
    mix = fusion_weights_from_logits(stacked.mean(dim=2), fusion)
    out = torch.einsum("be,beld->bld", mix, stacked)
    return out, mix


def project_fuse(pooled, weights, biases, fusion):
    """The op the model calls today (one tensor per encoder): the torch reference. `project_fuse_concat` is the
    fused form, on the concatenated pooled buffer the pooling op writes."""
    return project_fuse_reference(pooled, weights, biases, fusion)


# ----------------------------------------------------------------------------------------------------------------
# The fused op. Algebra (MERV_SPEC.md section 4), with pooled [B, L, K] = [pooled_1 | ... | pooled_E] (encoder e
# owns columns offsets[e]:offsets[e+1]), weight [D, K] = [W_1 | ... | W_E], bias [E, D]:
#   keys k_e   = means_e W_e^T + b_e                      (means = token mean of pooled: mean_n P_e without P_e)
#   logits     = ((q Wq^T + bq) . (k_e Wk^T + bk)) / sqrt(embed)  = (k_e . v + c) / sqrt(embed),
#                with v = (q Wq^T + bq) Wk and c = (q Wq^T + bq) . bk: no [B, E, embed] tensor is needed
#   mix        = softmax over e;  scales[b, k] = mix[b, e(k)]
#   out[b]     = (pooled[b] * scales[b]) @ weight^T + sum_e mix[b, e] b_e
# The three products over the big tensors (forward, weight+mix gradient, pooled gradient) are custom ops of their
# own, Triton kernels or their torch equivalents (`_engine`); everything else is tiny and stays in torch, so
# torch.compile sees through the backward. The keys and mix are recomputed in the backward (one [B, K] x [K, D]
# product), so only pooled, means and the parameters are saved.
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Small products, softmax, scales and accumulators: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TorchEngine:
    """The fused algebra in plain torch, for CPU tensors without the interpreter and for fp64 (which the kernels do
    not take). Same signatures and outputs as the Triton launchers in project_fuse_triton.py; the accumulation
    dtype is that of `scales`."""

    @staticmethod
    def forward(pooled, scales, weight, bias_mix):
        scaled = pooled.to(scales.dtype) * scales[:, None, :]
        return (scaled @ weight.to(scales.dtype).T + bias_mix[:, None, :]).to(pooled.dtype)

    @staticmethod
    def weight_mix_grad(pooled, grad_out, scales, weight, with_mix_grad):
        g, p = grad_out.to(scales.dtype), pooled.to(scales.dtype)
        grad_weight = torch.einsum("bld,blk->dk", g, p * scales[:, None, :])
        if with_mix_grad:  # sum_d (p^T g)[k, d] W[d, k] = sum_l p[l, k] (g W)[l, k]: no [K, D] per sample
            mix_cols = (p * (g @ weight.to(scales.dtype))).sum(1)
        else:
            mix_cols = scales.new_zeros(scales.shape)
        return grad_weight, mix_cols, g.sum(1)

    @staticmethod
    def pooled_grad(grad_out, scales, weight):
        product = grad_out.to(scales.dtype) @ weight.to(scales.dtype)
        return (product * scales[:, None, :]).to(grad_out.dtype)


def _engine(tensor: torch.Tensor):
    """The Triton launchers where the dispatch switch says triton (CUDA, or CPU under TRITON_INTERPRET=1) and the
    dtype is one the kernels take; the torch engine otherwise."""
    if tensor.dtype in _TRITON_DTYPES and resolve_backend(tensor) == "triton":
        from . import project_fuse_triton  # lazily: importing merv_fast must not need triton

        return project_fuse_triton
    return _TorchEngine


def _fusion_mix(means, offsets, weight, bias, fusion, compute_dtype):
    """-> (mix [B, E], keys [B, E, D], q [embed], v [D]) in compute_dtype; keys, q, v are None without fusion."""
    query, q_weight, q_bias, k_weight, k_bias = fusion
    if query is None:
        return torch.ones(means.shape[0], 1, dtype=compute_dtype, device=means.device), None, None, None
    keys = torch.stack([F.linear(means[:, lo:hi].to(compute_dtype), weight[:, lo:hi].to(compute_dtype),
                                 bias[e].to(compute_dtype))
                        for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:]))], dim=1)
    q = F.linear(query.to(compute_dtype), q_weight.to(compute_dtype), q_bias.to(compute_dtype))[0]
    v = q @ k_weight.to(compute_dtype)
    c = q @ k_bias.to(compute_dtype)  # the same for every encoder: it cancels in the softmax, kept for fidelity
    logits = (keys @ v + c) / math.sqrt(query.shape[-1])
    return logits.softmax(dim=-1), keys, q, v


def _column_scales(mix: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """mix [B, E] -> scales [B, K]: each column gets its encoder's weight."""
    b = mix.shape[0]
    blocks = enumerate(zip(offsets[:-1], offsets[1:]))
    return torch.cat([mix[:, e:e + 1].expand(b, hi - lo) for e, (lo, hi) in blocks], dim=1)


@torch.library.custom_op("merv_fast::project_fuse", mutates_args=())
def _project_fuse_op(pooled: torch.Tensor, means: torch.Tensor, offsets: list[int], weight: torch.Tensor,
                     bias: torch.Tensor, query: torch.Tensor | None, q_weight: torch.Tensor | None,
                     q_bias: torch.Tensor | None, k_weight: torch.Tensor | None,
                     k_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    compute_dtype = _compute_dtype(pooled.dtype)
    mix, _, _, _ = _fusion_mix(means, offsets, weight, bias, (query, q_weight, q_bias, k_weight, k_bias),
                               compute_dtype)
    bias_mix = mix @ bias.to(compute_dtype)
    out = _engine(pooled).forward(pooled, _column_scales(mix, offsets), weight, bias_mix)
    return out, mix.to(pooled.dtype)


@_project_fuse_op.register_fake
def _(pooled, means, offsets, weight, bias, query, q_weight, q_bias, k_weight, k_bias):
    return (pooled.new_empty(pooled.shape[0], pooled.shape[1], weight.shape[0]),
            pooled.new_empty(pooled.shape[0], len(offsets) - 1))


@torch.library.custom_op("merv_fast::project_fuse_weight_mix_grad", mutates_args=())
def _weight_mix_grad_op(pooled: torch.Tensor, grad_out: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor,
                        with_mix_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_weight [D, K], mix_cols [B, K], grad_colsum [B, D]), all in scales.dtype (the accumulation dtype):
    grad_weight = sum_b dY_b^T (pooled_b * scales_b), mix_cols[b, k] = sum_d (pooled_b^T dY_b)[k, d] W[d, k],
    grad_colsum[b] = sum_l dY_b[l]."""
    return _engine(pooled).weight_mix_grad(pooled, grad_out, scales, weight, with_mix_grad)


@_weight_mix_grad_op.register_fake
def _(pooled, grad_out, scales, weight, with_mix_grad):
    (b, _, k), d = pooled.shape, weight.shape[0]
    return scales.new_empty(d, k), scales.new_empty(b, k), scales.new_empty(b, d)


@torch.library.custom_op("merv_fast::project_fuse_pooled_grad", mutates_args=())
def _pooled_grad_op(grad_out: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(dY_b @ weight) * scales_b, in grad_out's dtype."""
    return _engine(grad_out).pooled_grad(grad_out, scales, weight)


@_pooled_grad_op.register_fake
def _(grad_out, scales, weight):
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], weight.shape[1])


def _setup_context(ctx, inputs, output):
    pooled, means, offsets, weight, bias, *fusion = inputs
    ctx.offsets = list(offsets)
    # Only the inputs: no P_e, no scaled copy, not even mix (recomputed from means in the backward).
    ctx.save_for_backward(pooled, means, weight, bias, *fusion)


def _backward(ctx, grad_out, grad_mix):
    pooled, means, weight, bias, query, q_weight, q_bias, k_weight, k_bias = ctx.saved_tensors
    (need_pooled, need_means, _, need_weight, need_bias, need_query, need_q_weight, need_q_bias, need_k_weight,
     need_k_bias) = ctx.needs_input_grad
    offsets = ctx.offsets
    has_fusion = query is not None
    compute_dtype = _compute_dtype(pooled.dtype)
    mix, keys, q, v = _fusion_mix(means, offsets, weight, bias, (query, q_weight, q_bias, k_weight, k_bias),
                                  compute_dtype)
    scales = _column_scales(mix, offsets)
    grads = dict.fromkeys(("pooled", "means", "weight", "bias", "query", "q_weight", "q_bias", "k_weight",
                           "k_bias"))
    if need_pooled:
        grads["pooled"] = torch.ops.merv_fast.project_fuse_pooled_grad(grad_out, scales, weight)

    needs_mix_grad = has_fusion and (need_means or need_weight or need_bias or need_query or need_q_weight
                                     or need_q_bias or need_k_weight or need_k_bias)
    if not (need_weight or need_bias or needs_mix_grad):
        return tuple(grads[name] for name in ("pooled", "means")) + (None,) + tuple(
            grads[name] for name in ("weight", "bias", "query", "q_weight", "q_bias", "k_weight", "k_bias"))

    grad_weight, mix_cols, grad_colsum = torch.ops.merv_fast.project_fuse_weight_mix_grad(
        pooled, grad_out, scales, weight, needs_mix_grad)
    grad_bias = mix.T @ grad_colsum  # d b_e = sum_b mix[b, e] sum_l dY_b[l]
    grad_means = None
    if needs_mix_grad:
        # d mix[b, e] = <pooled_be^T dY_b, W_e^T> + (sum_l dY_b[l]) . b_e  (the bias term counts)
        grad_mix_total = torch.stack([mix_cols[:, lo:hi].sum(1) for lo, hi in zip(offsets[:-1], offsets[1:])], 1)
        grad_mix_total = grad_mix_total + grad_colsum @ bias.to(compute_dtype).T
        if grad_mix is not None:
            grad_mix_total = grad_mix_total + grad_mix.to(compute_dtype)
        # Softmax, then logits = (k_e . v + c) / sqrt(embed). The softmax gradient mix_e (g_e - sum_j mix_j g_j)
        # is taken as mix_e sum_j mix_j (g_e - g_j): the same number, without the cancellation that loses most
        # digits when one encoder's weight is near 1.
        pairwise = grad_mix_total[:, :, None] - grad_mix_total[:, None, :]
        grad_logits = mix * (pairwise * mix[:, None, :]).sum(-1)
        grad_logits = grad_logits / math.sqrt(query.shape[-1])
        grad_v = torch.einsum("be,bed->d", grad_logits, keys)
        grad_c = grad_logits.sum()  # zero in exact arithmetic: sum_e of a softmax gradient
        grad_keys = grad_logits[:, :, None] * v  # [B, E, D]
        grad_q = k_weight.to(compute_dtype) @ grad_v + k_bias.to(compute_dtype) * grad_c
        grads["k_weight"] = torch.outer(q, grad_v).to(k_weight.dtype)
        grads["k_bias"] = (q * grad_c).to(k_bias.dtype)  # exactly zero in exact arithmetic
        grads["q_weight"] = torch.outer(grad_q, query[0].to(compute_dtype)).to(q_weight.dtype)
        grads["q_bias"] = grad_q.to(q_bias.dtype)
        grads["query"] = (grad_q @ q_weight.to(compute_dtype))[None].to(query.dtype)
        # Keys k_e = means_e W_e^T + b_e: W_e, b_e (and means) get gradient through them too.
        grad_bias = grad_bias + grad_keys.sum(0)
        grad_means_blocks = []
        for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            grad_weight[:, lo:hi].addmm_(grad_keys[:, e].T, means[:, lo:hi].to(compute_dtype))
            if need_means:
                grad_means_blocks.append(grad_keys[:, e] @ weight[:, lo:hi].to(compute_dtype))
        if need_means:
            grad_means = torch.cat(grad_means_blocks, 1).to(means.dtype)
    grads["means"] = grad_means
    grads["weight"] = grad_weight.to(weight.dtype) if need_weight else None
    grads["bias"] = grad_bias.to(bias.dtype) if need_bias else None
    for name, needed in (("query", need_query), ("q_weight", need_q_weight), ("q_bias", need_q_bias),
                         ("k_weight", need_k_weight), ("k_bias", need_k_bias)):
        if not needed:
            grads[name] = None
    return (grads["pooled"], grads["means"], None, grads["weight"], grads["bias"], grads["query"],
            grads["q_weight"], grads["q_bias"], grads["k_weight"], grads["k_bias"])


_project_fuse_op.register_autograd(_backward, setup_context=_setup_context)


def _fusion_tensors(fusion: FusionWeights | None) -> tuple:
    if fusion is None:
        return (None,) * 5
    return fusion.query, fusion.q_weight, fusion.q_bias, fusion.k_weight, fusion.k_bias


def project_fuse_concat(pooled: torch.Tensor, means: torch.Tensor, offsets: list[int], weight: torch.Tensor,
                        bias: torch.Tensor, fusion: FusionWeights | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op on the concatenated layout: pooled [B, L, K] (any strides), means [B, K] (token mean of pooled,
    as the pooling op emits it), offsets [0, C_1, C_1 + C_2, ..., K], weight [D, K] = [W_1 | ... | W_E],
    bias [E, D] -> (output [B, L, D], mix weights [B, E]), both in pooled's dtype.

    Gradient flows to `means` as an input of its own: when means was computed from pooled (by the pooling op, or
    by autograd), that op routes it on to pooled; this op adds only the direct term (dY_b @ weight) * scales_b.

    The dispatch switch picks the path: triton runs the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1);
    torch runs the release's computation (`project_fuse_reference`) on the split blocks.
    """
    e = len(offsets) - 1
    if offsets[0] != 0 or offsets[-1] != pooled.shape[-1] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets {offsets} do not split the {pooled.shape[-1]} pooled columns")
    if weight.shape != (weight.shape[0], pooled.shape[-1]) or bias.shape != (e, weight.shape[0]):
        raise ValueError(f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit {e} encoders of "
                         f"{pooled.shape[-1]} columns")
    if means.shape != (pooled.shape[0], pooled.shape[-1]):
        raise ValueError(f"means {tuple(means.shape)} do not fit pooled {tuple(pooled.shape)}")
    if fusion is None and e != 1:
        raise ValueError(f"{e} encoders need fusion weights")
    # Under torch.compile the custom op is always the path (it picks its engine at run time, below the trace):
    # the dispatch switch reads a ContextVar and the environment, which dynamo cannot trace without a break.
    if not torch.compiler.is_compiling() and resolve_backend(pooled) == "torch":
        blocks = list(zip(offsets[:-1], offsets[1:]))
        return project_fuse_reference([pooled[..., lo:hi] for lo, hi in blocks],
                                      [weight[:, lo:hi] for lo, hi in blocks], list(bias.unbind(0)), fusion)
    if weight.dtype != pooled.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from pooled dtype {pooled.dtype}")
    return torch.ops.merv_fast.project_fuse(pooled, means, list(offsets), weight, bias, *_fusion_tensors(fusion))


class ReleaseFusion(torch.nn.Module):
    """The release's own modules, for tests and benchmarks: per-encoder `nn.Linear` projectors, then its
    `CrossAttentionAdapterLearnableQuery(averagetoken=True)` built on `nn.MultiheadAttention` (which also computes
    the value and output projections that it then discards). Copies the given weights; computes the same function.
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], fusion: FusionWeights,
                 attention_state: dict[str, torch.Tensor]):
        super().__init__()
        d, embed = weights[0].shape[0], fusion.query.shape[-1]
        kw = dict(device=weights[0].device, dtype=weights[0].dtype)
        self.projectors = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], d, **kw) for w in weights)
        for proj, w, b in zip(self.projectors, weights, biases):
            proj.load_state_dict({"weight": w.detach(), "bias": b.detach()})
        self.Q = torch.nn.Parameter(fusion.query.detach().clone())
        self.attention = torch.nn.MultiheadAttention(embed, num_heads=1, batch_first=True, kdim=d, vdim=d, **kw)
        self.attention.load_state_dict({k: v.detach() for k, v in attention_state.items()})

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        projected = [p(x) for p, x in zip(self.projectors, pooled)]
        b, e, (length, d) = projected[0].shape[0], len(projected), projected[0].shape[1:]
        v = torch.stack(projected, 1)  # [B, E, L, D]
        keys = v.mean(2)
        _, weights = self.attention(query=self.Q.repeat(b, 1).unsqueeze(1), key=keys, value=keys)
        return torch.bmm(weights, v.reshape(b, e, length * d)).reshape(b, length, d)
