"""The visual path between the frozen encoders and the LLM: pooling -> projection -> fusion (spec sections 3-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from merv_fast.arch import parse_arch
from merv_fast.config import ModelConfig
from merv_fast.kernels.pooling import pool_concat, square_grid
from merv_fast.kernels.project_fuse import FusionWeights, fusion_weights_from_logits, project_fuse_concat
from merv_fast.model.poolers import build_pooler, init_linear_jepa


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
        # The release's draw order: nn.MultiheadAttention's q, k, v projections, then the query (`Q`).
        for p in (a.q_proj_weight, a.k_proj_weight, a.v_proj_weight, self.query):
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


def _head(projector: str, width: int, llm_dim: int) -> nn.Sequential | None:
    """The projector MLP's layers before its last Linear, indexed as the release's nn.Sequential indexes them
    (gelu-mlp: Linear, GELU; fused-gelu-mlp: Linear, GELU, Linear, GELU); None for linear and none."""
    if projector == "gelu-mlp":
        return nn.Sequential(nn.Linear(width, llm_dim), nn.GELU())
    if projector == "fused-gelu-mlp":
        return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, llm_dim), nn.GELU())
    return None


class ChannelFusion(nn.Module):
    """`concat_channel` / `concat_channel_ln`: the encoders' P_e side by side [B, L, E*D], (LayerNorm), one Linear
    to D. Named after its release parameters by model/release.py."""

    def __init__(self, width: int, llm_dim: int, layer_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else None
        self.linear = nn.Linear(width, llm_dim)


class VisualPath(nn.Module):
    """Encoder features (one [B, T_e, N_e, C_e] tensor per encoder) -> visual tokens [B, V, D_llm], as the
    configured architecture specifier and fusion say (merv_fast/arch.py).

    Per encoder: resampling (fixed means or a learned pooler), the projector's MLP head (if any), the projector's last
    Linear; then the fusion. Wherever the last Linear is followed by a linear fusion it runs as one product over all
    encoders' columns (kernels/project_fuse.py): cross_attention_avg_lq weights each encoder's block by its mix
    weight; concat_channel's Linear over [P_1 | ... | P_E] composes with the projectors into the single product
    X [F_1 W_1 | ... | F_E W_E]^T + (f + sum_e F_e b_e), so no P_e exists. With fixed pooling (3davg, avg) the
    pooling op writes every encoder into its column block of one [B, L, sum C_e] buffer (plus the pooled tokens'
    means, which the fusion keys need).

    Modules: `projectors[e]` the last Linear of encoder e's projector (absent with `none`), `heads[e]` the MLP layers
    before it, `poolers[e]` a learned pooler, `fusion` the cross-attention (frozen and never computed with one
    encoder, where the softmax over one key is exactly 1: kept so the release's single-encoder checkpoints load),
    `channel_fusion` the concat_channel(_ln) Linear.
    """

    def __init__(self, cfg: ModelConfig, llm_dim: int):
        super().__init__()
        self.spec = parse_arch(cfg.visual.arch)
        self.fusion_kind = cfg.visual.fusion
        self.encoder_names = [e.name for e in cfg.encoders]
        self.grids_out = [cfg.token_grid(e) for e in cfg.encoders]
        self.pool_size = tuple(self.grids_out[0])
        spec, n = self.spec, len(cfg.encoders)
        widths = [llm_dim if spec.projector_input_is_llm_width else e.hidden_size for e in cfg.encoders]
        self.poolers = nn.ModuleList(build_pooler(spec.pooling, e.hidden_size, llm_dim, g)
                                     for e, g in zip(cfg.encoders, self.grids_out)) if spec.learned_pooling else None
        heads = [_head(spec.projector, w, llm_dim) for w in widths]
        self.heads = nn.ModuleList(heads) if heads[0] is not None else None
        last_in = [llm_dim if self.heads is not None else w for w in widths]  # the last Linear's input width
        self.projectors = None if spec.projector == "none" else nn.ModuleList(nn.Linear(w, llm_dim) for w in last_in)
        if spec.pooling == "attntv":  # the release's pooler initialises its projector with its own scheme
            inside = {id(m) for m in self.poolers.modules()}
            for m in self.modules():
                if isinstance(m, nn.Linear) and not m.weight.is_meta and id(m) not in inside:
                    init_linear_jepa(m)
        self.fusion = None
        self.channel_fusion = None
        if self.fusion_kind == "cross_attention_avg_lq":
            self.fusion = CrossAttentionFusion(cfg.visual.fusion_embed_dim, llm_dim)
            if n == 1:
                self.fusion.requires_grad_(False)
        elif self.fusion_kind in ("concat_channel", "concat_channel_ln"):
            self.channel_fusion = ChannelFusion(n * llm_dim, llm_dim, self.fusion_kind == "concat_channel_ln")
        self.offsets = [sum(last_in[:i]) for i in range(len(last_in) + 1)]

    @property
    def fixed_pooling(self) -> bool:
        """Pooling without parameters (3davg, avg): the pooled features can be computed once and cached."""
        return self.spec.pooling is not None and not self.spec.learned_pooling

    def pool(self, features: list[torch.Tensor],
             grids: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed pooling -> (pooled [B, L, K], means [B, K]): encoder e owns columns offsets[e]:offsets[e+1]."""
        if len(features) != len(self.encoder_names):
            raise ValueError(f"expected features from {len(self.encoder_names)} encoders {self.encoder_names}, "
                             f"got {len(features)}")
        if not self.fixed_pooling:
            raise ValueError(f"visual.arch={self.spec.text!r} has no fixed pooling to run on its own")
        grids = grids or [square_grid(f.shape[2]) for f in features]
        return pool_concat(features, [tuple(g) for g in grids], self.pool_size)

    def forward(self, features: list[torch.Tensor] | PooledFeatures,
                grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        tokens, _ = self.forward_with_mix(features, grids)
        # FSDP2 hooks the outputs of the modules it wraps (this one is a unit): a view (the torch path's einsum
        # returns one) would lose the hook to an in-place op downstream, and FSDP2 warns on every step. Gradients are
        # right either way (tests/train/test_fsdp.py); a copy of the visual tokens is cheap.
        return tokens.clone() if tokens._base is not None else tokens

    def _inputs(self, features, grids, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (X [B, L, K], its token means [B, K]): each encoder's input to its projector's last Linear (or, with
        `none`, its output), encoder e in columns offsets[e]:offsets[e+1]."""
        if isinstance(features, PooledFeatures):
            if not self.fixed_pooling:
                raise ValueError(f"pre-pooled features need fixed pooling; visual.arch={self.spec.text!r}")
            x, means = features.pooled, features.means
            if x.shape[-1] != sum(self.pooled_widths) or means.shape[-1] != x.shape[-1]:
                raise ValueError(f"pre-pooled features have {x.shape[-1]} columns; the encoders "
                                 f"{self.encoder_names} have {sum(self.pooled_widths)}")
        elif self.fixed_pooling:
            x, means = self.pool(features, grids)
        else:
            if len(features) != len(self.encoder_names):
                raise ValueError(f"expected features from {len(self.encoder_names)} encoders {self.encoder_names}, "
                                 f"got {len(features)}")
            grids = grids or [square_grid(f.shape[2]) for f in features]
            if self.poolers is None:  # no pooling (one encoder): every token, frame-major
                x = features[0].flatten(1, 2)
            else:
                x = torch.cat([p(f.to(dtype), tuple(g)) for p, f, g in zip(self.poolers, features, grids)], -1)
            means = None
        if self.heads is not None:
            blocks = torch.split(x, self.pooled_widths, dim=-1)
            x = torch.cat([h(b.to(dtype)) for h, b in zip(self.heads, blocks)], -1)
            means = None
        x = x.to(dtype)
        return x, (x.mean(1) if means is None else means.to(dtype))

    @property
    def pooled_widths(self) -> list[int]:
        """Each encoder's width after resampling (the projector's input)."""
        if self.heads is not None:
            return [h[0].in_features for h in self.heads]
        return [hi - lo for lo, hi in zip(self.offsets, self.offsets[1:])]

    def forward_with_mix(self, features, grids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Also returns the cross-attention's per-(sample, encoder) weights [B, E] (None for other fusions)."""
        like = next(self.parameters(), None)  # `3davg+none` with `first` or `concat` has no parameter at all
        if like is None:
            like = features.pooled if isinstance(features, PooledFeatures) else features[0]
        dtype = compute_dtype(like)
        x, means = self._inputs(features, grids, dtype)
        blocks = list(zip(self.offsets[:-1], self.offsets[1:]))
        if self.projectors is not None:
            weight = torch.cat([p.weight for p in self.projectors], dim=1).to(dtype)
            bias = torch.stack([p.bias for p in self.projectors]).to(dtype)
        kind = self.fusion_kind
        if kind == "cross_attention_avg_lq":
            fusion = self.fusion.weights(dtype) if len(blocks) > 1 else None
            if self.projectors is None:
                projected = [x[..., lo:hi] for lo, hi in blocks]
                if fusion is None:
                    return projected[0], torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
                mix = fusion_weights_from_logits(torch.stack([p.mean(1) for p in projected], 1), fusion)
                return torch.einsum("be,beld->bld", mix, torch.stack(projected, 1)), mix
            return project_fuse_concat(x, means, self.offsets, weight, bias, fusion)
        if kind == "concat_channel" and self.projectors is not None:
            lin = self.channel_fusion.linear
            f_w, d = lin.weight.to(dtype), weight.shape[0]
            composed = torch.cat([f_w[:, e * d:(e + 1) * d] @ weight[:, lo:hi] for e, (lo, hi) in enumerate(blocks)],
                                 dim=1)
            composed_bias = lin.bias.to(dtype) + sum(f_w[:, e * d:(e + 1) * d] @ bias[e] for e in range(len(blocks)))
            out, _ = project_fuse_concat(x, means, [0, x.shape[-1]], composed, composed_bias[None], None)
            return out, None
        if self.projectors is None:
            projected = [x[..., lo:hi] for lo, hi in blocks]
        else:
            projected = [F.linear(x[..., lo:hi], weight[:, lo:hi], bias[e]) for e, (lo, hi) in enumerate(blocks)]
        if kind == "first":
            return projected[0], None
        if kind == "concat":  # sequence concat: every encoder's tokens, one encoder after another
            return torch.cat(projected, dim=1), None
        joined = torch.cat(projected, dim=-1)  # concat_channel(_ln)
        cf = self.channel_fusion
        if cf.norm is not None:
            joined = F.layer_norm(joined, cf.norm.normalized_shape, cf.norm.weight.to(dtype), cf.norm.bias.to(dtype),
                                  cf.norm.eps)
        return F.linear(joined, cf.linear.weight.to(dtype), cf.linear.bias.to(dtype)), None
