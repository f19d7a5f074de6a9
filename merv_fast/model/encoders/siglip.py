"""SigLIP ViT from transformers' `Siglip*` pieces: patch embeddings (no CLS token) and the first `layers_run`
encoder layers. With `output="tokens"` (the release's `-all-no-cls` ids) nothing else is built: the release takes
block n-1 of n raw, through timm's `get_intermediate_layers`. With `output="pooled"` (its other SigLIP ids, which run
timm's whole forward: siglip.py:47-79, 142-151) every block, the final norm and the MAP attention-pooling head are
built, and each frame yields one token. Position embeddings trained at another resolution (256, 384 px) are
resampled to the run's grid at load time as timm does (bicubic, antialias, float32).

Parameter names are those of `SiglipVisionModel`. Checkpoints: Hugging Face layout (a full `SiglipModel`'s
`vision_model.*` tower included) or timm's `vit_base_patch16_siglip_224` layout (`blocks.N.attn.qkv`, `pos_embed`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import (
    SiglipEncoderLayer,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionEmbeddings,
)

from merv_fast.config import EncoderConfig
from merv_fast.model.encoders.base import (
    Encoder, StateDict, WeightsError, convert_timm_blocks, find_tower, hf_vit_kwargs, resample_patch_positions,
)

TIMM_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class SiglipEncoder(Encoder):
    TIMM_BLOCK_NAMES = TIMM_BLOCK_NAMES
    TIMM_LAYER_PREFIX = "encoder.layers."

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        hf = SiglipVisionConfig(**hf_vit_kwargs(cfg), intermediate_size=cfg.intermediate_size, vision_use_head=False)
        self.embeddings = SiglipVisionEmbeddings(hf)
        # Our forward adds the position table directly, so the non-persistent `position_ids` buffer is not needed;
        # dropping it means a meta-built module materialised with `to_empty` has no uninitialised index buffer.
        del self.embeddings.position_ids
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipEncoderLayer(hf) for _ in range(cfg.layers_run))
        if cfg.output == "pooled":
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.head = SiglipMultiheadAttentionPoolingHead(hf)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, frames = pixels.shape[:2]
        conv = self.embeddings.patch_embedding
        x = conv(pixels.flatten(0, 1).to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding.weight
        for layer in self.blocks:
            x = layer(x, None)
        if self.config.output == "pooled":
            x = self.head(self.post_layernorm(x))[:, None]  # [B*T, 1, C]
        return x.unflatten(0, (batch, frames))

    def checkpoint_to_module(self, state: StateDict, source: str) -> StateDict:
        timm = find_tower(state, "blocks.0.attn.qkv.weight", source)
        if timm is not None:
            mapped = convert_timm_blocks(timm, TIMM_BLOCK_NAMES, "encoder.layers.")
            renames = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                       "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}
            mapped.update({ours: timm[theirs] for theirs, ours in renames.items() if theirs in timm})
            if "pos_embed" in timm:  # timm [1, n, C] -> an nn.Embedding table [n, C]
                mapped["embeddings.position_embedding.weight"] = timm["pos_embed"][0]
            mapped.update(_timm_head(timm))
        else:
            mapped = find_tower(state, "embeddings.patch_embedding.weight", source)
            if mapped is None:
                raise WeightsError(f"{source}: neither a timm ViT (blocks.0.attn.qkv.weight) nor a Hugging Face SigLIP "
                                   f"vision tower (embeddings.patch_embedding.weight); keys look like "
                                   f"{sorted(state)[:5]}")
        key = "embeddings.position_embedding.weight"
        if key in mapped:
            mapped[key] = resample_patch_positions(mapped[key][None], self.config.patch_grid)[0]
        return mapped


def _timm_head(timm: StateDict) -> StateDict:
    """timm's final norm and MAP head (`norm`, `attn_pool.{latent,q,kv,proj,norm,mlp}`) -> transformers' names: the
    head's attention is an nn.MultiheadAttention whose packed input projection is [q; k; v], and timm's kv rows are
    k then v."""
    out = {}
    for part in ("weight", "bias"):
        for theirs, ours in (("norm", "post_layernorm"), ("attn_pool.proj", "head.attention.out_proj"),
                             ("attn_pool.norm", "head.layernorm"), ("attn_pool.mlp.fc1", "head.mlp.fc1"),
                             ("attn_pool.mlp.fc2", "head.mlp.fc2")):
            if f"{theirs}.{part}" in timm:
                out[f"{ours}.{part}"] = timm[f"{theirs}.{part}"]
        if f"attn_pool.q.{part}" in timm and f"attn_pool.kv.{part}" in timm:
            out[f"head.attention.in_proj_{part}"] = torch.cat([timm[f"attn_pool.q.{part}"],
                                                              timm[f"attn_pool.kv.{part}"]])
    if "attn_pool.latent" in timm:
        out["head.probe"] = timm["attn_pool.latent"]
    return out
