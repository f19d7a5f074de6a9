"""LanguageBind video encoder: a CLIP ViT whose every layer first attends across the frames of a clip.

Parameter names follow the Hugging Face layout of `LanguageBind/LanguageBind_Video_merged` (its `vision_model.*`
tower), so that checkpoint loads as is; its text tower, `post_layernorm` and `visual_projection` are not built because
the features are taken before them.

Per layer (spec section 2): frames are grouped into clips of `clip_frames` consecutive frames; a learned temporal
embedding (one vector per frame position) is added to every token; then, for each token position (CLS included),
the clip's frames attend to each other (`temporal_layer_norm1` -> `temporal_attn`, residual); then the usual pre-norm
CLIP spatial attention and MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from merv_fast.config import EncoderConfig
from merv_fast.model.encoders.base import Encoder, StateDict, WeightsError, find_tower


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as the release computed it (scores materialised, softmax in fp32): the reference SDPA must match."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class ClipAttention(nn.Module):
    """CLIP multi-head attention (q/k/v/out projections with bias) through PyTorch SDPA (or `eager_attention`, the
    release's way, when configured); SDPA's default scale 1/sqrt(head_dim) is CLIP's."""

    def __init__(self, width: int, heads: int, attention: str = "sdpa"):
        super().__init__()
        self.heads = heads
        self.attend = F.scaled_dot_product_attention if attention == "sdpa" else eager_attention
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [sequences, length, width]
        n, length, width = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = self.attend(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        width = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens_per_step + 1, width)
        nn.init.normal_(self.class_embedding, std=width ** -0.5)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [frames, 3, S, S] -> [frames, 1 + H*W, width]
        patches = self.patch_embedding(frames.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class TemporalClipLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        width = cfg.hidden_size
        self.clip_frames = cfg.clip_frames
        self.temporal_embedding = nn.Parameter(torch.empty(1, cfg.clip_frames, width))
        nn.init.normal_(self.temporal_embedding, std=width ** -0.5)
        self.temporal_layer_norm1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.temporal_attn = ClipAttention(width, cfg.num_heads, cfg.attention)
        self.layer_norm1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(width, cfg.num_heads, cfg.attention)
        self.layer_norm2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(width, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [frames, tokens, width], frames = clips * clip_frames
        frames, tokens, width = x.shape
        t = self.clip_frames
        clips = x.view(frames // t, t, tokens, width)
        if t > 1:  # the release adds the temporal embedding only to multi-frame clips
            clips = clips + self.temporal_embedding[:, :t].unsqueeze(2).to(x.dtype)
        # one sequence of t frames per (clip, token position)
        seqs = clips.transpose(1, 2).reshape(-1, t, width)
        seqs = seqs + self.temporal_attn(self.temporal_layer_norm1(seqs))
        x = seqs.view(frames // t, tokens, t, width).transpose(1, 2).reshape(frames, tokens, width)

        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class LanguageBindEncoder(Encoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        if cfg.clip_frames < 1 or cfg.frames % cfg.clip_frames:
            raise ValueError(f"languagebind: clip_frames={cfg.clip_frames} must be >= 1 and divide frames={cfg.frames}")
        self.vision_model = nn.Module()
        self.vision_model.embeddings = ClipVisionEmbeddings(cfg)
        self.vision_model.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(TemporalClipLayer(cfg) for _ in range(cfg.layers_run))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, frames = pixels.shape[:2]
        if frames % self.config.clip_frames:
            raise ValueError(f"languagebind: {frames} frames do not split into clips of {self.config.clip_frames}")
        x = self.vision_model.embeddings(pixels.flatten(0, 1))
        x = self.vision_model.pre_layrnorm(x)
        for layer in self.blocks:
            x = layer(x)
        return x[:, 1:].unflatten(0, (batch, frames))

    def checkpoint_to_module(self, state: StateDict, source: str) -> StateDict:
        tower = find_tower(state, "embeddings.class_embedding", source)
        if tower is None:
            raise WeightsError(f"{source}: no LanguageBind/CLIP vision tower (no key ending in "
                               f"'embeddings.class_embedding'); keys look like {sorted(state)[:5]}")
        return {"vision_model." + k: v for k, v in tower.items()}
