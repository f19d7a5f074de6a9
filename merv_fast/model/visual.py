"""The visual path between the frozen encoders and the LLM: pooling -> projection -> fusion (spec sections 3-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from merv_fast.config import ModelConfig
from merv_fast.kernels.pooling import pool_concat, square_grid
from merv_fast.kernels.project_fuse import FusionWeights, project_fuse_concat


@dataclass
class PooledFeatures:
    """Features already pooled (the feature cache's): what `VisualPath.pool` returns, pooled [B, L, K] with encoder e
    in columns offsets[e]:offsets[e+1], and the pooled tokens' means [B, K]. The visual path takes it in place of the
    per-encoder feature list and skips pooling."""

    pooled: torch.Tensor
    means: torch.Tensor


class CrossAttentionFusion(nn.Module):
    """The release's `cross_attention_avg_lq` parameters, named as its `nn.MultiheadAttention` names them.

    Only the query, the query/key projections and their biases reach the output. The value and output projections
    are kept so release checkpoints load and export unchanged, but they are frozen and never computed (in the
    release they are computed, thrown away, and so never receive a gradient either).
    """

    def __init__(self, embed_dim: int, key_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.empty(1, embed_dim))
        self.attention = nn.Module()
        self.attention.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.attention.k_proj_weight = nn.Parameter(torch.empty(embed_dim, key_dim))
        self.attention.v_proj_weight = nn.Parameter(torch.empty(embed_dim, key_dim), requires_grad=False)
        self.attention.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.attention.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attention.out_proj.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query.is_meta:
            return
        a = self.attention
        for p in (self.query, a.q_proj_weight, a.k_proj_weight, a.v_proj_weight):
            nn.init.xavier_uniform_(p)
        nn.init.zeros_(a.in_proj_bias)
        nn.init.zeros_(a.out_proj.bias)

    def weights(self, dtype: torch.dtype | None = None) -> FusionWeights:
        e, a = self.embed_dim, self.attention
        tensors = (self.query, a.q_proj_weight, a.in_proj_bias[:e], a.k_proj_weight, a.in_proj_bias[e:2 * e])
        return FusionWeights(*(t.to(dtype) if dtype is not None else t for t in tensors))


def compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's when it is on (the fused op is a custom op, which autocast does
    not cast for us), else the parameters' own."""
    if torch.is_autocast_enabled(like.device.type):
        return torch.get_autocast_dtype(like.device.type)
    return like.dtype


class VisualPath(nn.Module):
    """Encoder features (one [B, T_e, N_e, C_e] tensor per encoder) -> [B, T'*H'*W', D_llm] visual tokens.

    Pooling writes every encoder into its column block of one [B, L, sum C_e] buffer (plus the pooled tokens'
    means, which the fusion keys need); the projection + fusion then runs as one product over the concatenated
    columns. Both ops run fused Triton kernels or the release's torch computation, as kernels/dispatch.py decides.
    """

    def __init__(self, cfg: ModelConfig, llm_dim: int):
        super().__init__()
        self.encoder_names = [e.name for e in cfg.encoders]
        self.pool_size = tuple(cfg.visual.pool_size)
        self.projectors = nn.ModuleList(nn.Linear(e.hidden_size, llm_dim) for e in cfg.encoders)
        self.fusion = CrossAttentionFusion(cfg.visual.fusion_embed_dim, llm_dim) if len(cfg.encoders) > 1 else None
        widths = [e.hidden_size for e in cfg.encoders]
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]

    def pool(self, features: list[torch.Tensor],
             grids: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled [B, L, K], means [B, K]): encoder e owns columns offsets[e]:offsets[e+1]."""
        if len(features) != len(self.projectors):
            raise ValueError(f"expected features from {len(self.projectors)} encoders {self.encoder_names}, "
                             f"got {len(features)}")
        grids = grids or [square_grid(f.shape[2]) for f in features]
        return pool_concat(features, [tuple(g) for g in grids], self.pool_size)

    def forward(self, features: list[torch.Tensor] | PooledFeatures,
                grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        tokens, _ = self.forward_with_mix(features, grids)
        # FSDP2 hooks the outputs of the modules it wraps (this one is a unit): a view (the torch path's einsum
        # returns one) would lose the hook to an in-place op downstream, and FSDP2 warns on every step. Gradients are
        # right either way (tests/train/test_fsdp.py); a copy of the visual tokens is cheap.
        return tokens.clone() if tokens._base is not None else tokens

    def forward_with_mix(self, features, grids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Also returns the fusion's per-(sample, encoder) weights [B, E], for inspection and tests."""
        dtype = compute_dtype(self.projectors[0].weight)
        if isinstance(features, PooledFeatures):
            pooled, means = features.pooled, features.means
            if pooled.shape[-1] != self.offsets[-1] or means.shape[-1] != self.offsets[-1]:
                raise ValueError(f"pre-pooled features have {pooled.shape[-1]} columns; the encoders "
                                 f"{self.encoder_names} have {self.offsets[-1]}")
        else:
            pooled, means = self.pool(features, grids)
        weight = torch.cat([p.weight for p in self.projectors], dim=1).to(dtype)
        bias = torch.stack([p.bias for p in self.projectors]).to(dtype)
        fusion = self.fusion.weights(dtype) if self.fusion is not None else None
        return project_fuse_concat(pooled.to(dtype), means.to(dtype), self.offsets, weight, bias, fusion)
