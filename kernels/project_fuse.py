"""Projection of each encoder's pooled tokens to the LLM width, and the cross-attention fusion (spec section 4).

`project_fuse_reference` is the release's computation, step for step: every projector output P_e is materialised,
keys are the token means of P_e, one learnable query attends over the E keys (single head, scaled by
1/sqrt(embed_dim)), and the output is the softmax-weighted sum of the P_e. The value and output projections of the
release's `nn.MultiheadAttention` never influence the result and are not computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """The op the model calls. Only the torch path exists so far; the fused Triton kernels plug in here."""
    return project_fuse_reference(pooled, weights, biases, fusion)


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
