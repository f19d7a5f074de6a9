"""SigLIP ViT from transformers' `Siglip*` pieces: patch embeddings (no CLS token) and the first `layers_run`
encoder layers. Not built: the post layernorm and the attention-pooling head (the release takes block 11 of 12 raw,
through timm's `get_intermediate_layers`).

Parameter names are those of `SiglipVisionModel`. Checkpoints: Hugging Face layout (a full `SiglipModel`'s
`vision_model.*` tower included) or timm's `vit_base_patch16_siglip_224` layout (`blocks.N.attn.qkv`, `pos_embed`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from merv_fast.config import EncoderConfig
from merv_fast.model.encoders.base import (
    Encoder, StateDict, WeightsError, convert_timm_blocks, find_tower, hf_vit_kwargs,
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
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        hf = SiglipVisionConfig(**hf_vit_kwargs(cfg), intermediate_size=cfg.intermediate_size, vision_use_head=False)
        self.embeddings = SiglipVisionEmbeddings(hf)
        # Our forward adds the position table directly, so the non-persistent `position_ids` buffer is not needed;
        # dropping it means a meta-built module materialised with `to_empty` has no uninitialised index buffer.
        del self.embeddings.position_ids
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipEncoderLayer(hf) for _ in range(cfg.layers_run))

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
            return mapped
        tower = find_tower(state, "embeddings.patch_embedding.weight", source)
        if tower is None:
            raise WeightsError(f"{source}: neither a timm ViT (blocks.0.attn.qkv.weight) nor a Hugging Face SigLIP "
                               f"vision tower (embeddings.patch_embedding.weight); keys look like {sorted(state)[:5]}")
        return tower
