"""DINOv2 ViT with register tokens, from transformers' `Dinov2WithRegisters*` pieces.

Built: the embeddings and the first `layers_run` layers; not the final layernorm (the release takes block 23's raw
output through timm's `get_intermediate_layers`). Output drops CLS and the register tokens.

The release used timm's `vit_large_patch14_reg4_dinov2` created at img_size 224, so its position embeddings (trained
at 518 px, a 37x37 grid) were resampled once at load time to the 16x16 grid: bicubic with antialias, in float32,
patch positions only. We do the same at load time and build the module at `cfg.image_size`, so the runtime
interpolation in transformers is a no-op. Checkpoints: Hugging Face layout (either spelling of the attention
names), timm layout (`blocks.N.attn.qkv`, no-embed-class `pos_embed`, `reg_token`) or Meta's original layout
(`register_tokens`, `pos_embed` with a CLS slot).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2WithRegistersConfig
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
    Dinov2WithRegistersLayer,
)

from merv_fast.config import EncoderConfig
from merv_fast.model.encoders.base import (
    Encoder, StateDict, WeightsError, convert_timm_blocks, find_tower, hf_vit_kwargs, rename_fragments,
    resample_patch_positions,
)

# (older, newer) spellings: transformers renamed the attention projections between 5.17 and 5.24
ATTENTION_SPELLINGS = [
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
]

TIMM_BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls2.gamma": "layer_scale2.lambda1",
}


class Dinov2Encoder(Encoder):
    TIMM_BLOCK_NAMES = TIMM_BLOCK_NAMES
    TIMM_LAYER_PREFIX = "encoder.layer."

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        # transformers sizes the MLP by an integer `mlp_ratio` (its config type-checks it), not by intermediate_size
        mlp_ratio, remainder = divmod(cfg.intermediate_size, cfg.hidden_size)
        if remainder:
            raise ValueError(f"dinov2: intermediate_size {cfg.intermediate_size} is not a multiple of "
                             f"hidden_size {cfg.hidden_size}")
        hf = Dinov2WithRegistersConfig(**hf_vit_kwargs(cfg), num_register_tokens=cfg.registers, mlp_ratio=mlp_ratio,
                                       layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False)
        self.embeddings = Dinov2WithRegistersEmbeddings(hf)
        # Only masked pre-training reads the mask token; timm checkpoints do not carry it, so it is not built.
        del self.embeddings.mask_token
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Dinov2WithRegistersLayer(hf) for _ in range(cfg.layers_run))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, frames = pixels.shape[:2]
        x = self.embeddings(pixels.flatten(0, 1))
        for layer in self.blocks:
            x = layer(x)
        return x[:, 1 + self.config.registers:].unflatten(0, (batch, frames))

    def checkpoint_to_module(self, state: StateDict, source: str) -> StateDict:
        timm = find_tower(state, "blocks.0.attn.qkv.weight", source)
        if timm is not None:
            mapped = self._from_timm(timm, source)
        else:
            mapped = find_tower(state, "embeddings.register_tokens", source)
            if mapped is None:
                raise WeightsError(f"{source}: neither a timm ViT (blocks.0.attn.qkv.weight) nor a Hugging Face "
                                   f"DINOv2-with-registers (embeddings.register_tokens); "
                                   f"keys look like {sorted(state)[:5]}")
        key = "embeddings.position_embeddings"
        if key in mapped:  # [1, 1 + n, C]: keep the CLS slot, fit the patch slots to our grid
            pos = mapped[key]
            mapped[key] = torch.cat([pos[:, :1], resample_patch_positions(pos[:, 1:], self.grid)], dim=1)
        return rename_fragments(mapped, ATTENTION_SPELLINGS, set(self.state_dict()))

    def _from_timm(self, timm: StateDict, source: str) -> StateDict:
        mapped = convert_timm_blocks(timm, TIMM_BLOCK_NAMES, "encoder.layer.")
        mapped["embeddings.patch_embeddings.projection.weight"] = timm.get("patch_embed.proj.weight")
        mapped["embeddings.patch_embeddings.projection.bias"] = timm.get("patch_embed.proj.bias")
        pos = timm.get("pos_embed")
        if "register_tokens" in timm:  # Meta's layout: pos_embed has a CLS slot, CLS token without its position
            mapped["embeddings.register_tokens"] = timm["register_tokens"]
            mapped["embeddings.cls_token"] = timm.get("cls_token")
            mapped["embeddings.position_embeddings"] = pos
        elif pos is not None and "cls_token" in timm:
            # timm's no-embed-class layout: CLS already holds its position and pos_embed covers patches only, so
            # the CLS slot we add is zero (cls + 0 = timm's cls).
            mapped["embeddings.register_tokens"] = timm.get("reg_token")
            mapped["embeddings.cls_token"] = timm["cls_token"]
            mapped["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        return {k: v for k, v in mapped.items() if v is not None}
