"""ViViT (joint space-time attention over tubelet tokens) from transformers' `VivitModel`.

Built with `num_hidden_layers = layers_run` and without the pooler; the taken output is `last_hidden_state` (after
the final layernorm, `cfg.final_norm`), CLS dropped. Tubelets of `tubelet` frames make `frames / tubelet` time steps,
and the patch tokens come out time-major then row-major, which is our [T_out, H*W] order.

Parameter names are `vivit.*`, the layout of `VivitForVideoClassification` checkpoints
(`google/vivit-b-16x2-kinetics400`); a bare `VivitModel` checkpoint loads too, and the older ViT spelling of the layer names is translated.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import VivitConfig, VivitModel

from merv_fast.config import EncoderConfig
from merv_fast.model.encoders.base import Encoder, StateDict, WeightsError, find_tower, hf_vit_kwargs, rename_fragments

# (older, newer): checkpoints saved with the ViT-style names vs the names transformers 5 builds; order matters
# ("attention.output.dense" must be renamed before the MLP's "output.dense").
LAYER_SPELLINGS = [
    ("encoder.layer.", "layers."),
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]


class VivitEncoder(Encoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        if not cfg.final_norm:
            raise ValueError("vivit: the release takes last_hidden_state, which includes the final norm")
        kwargs = hf_vit_kwargs(cfg)
        patch = kwargs.pop("patch_size")
        hf = VivitConfig(**kwargs, num_frames=cfg.frames, tubelet_size=[cfg.tubelet, patch, patch],
                         intermediate_size=cfg.intermediate_size, qkv_bias=True)
        self.vivit = VivitModel(hf, add_pooling_layer=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vivit.layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # VivitModel reads [B, T, C, H, W], as we receive
        # its tubelet conv does not cast the input, and the frozen encoders usually run in bf16
        pixels = pixels.to(self.vivit.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = self.vivit(pixel_values=pixels).last_hidden_state
        return hidden[:, 1:].unflatten(1, (self.out_frames, -1))

    def checkpoint_to_module(self, state: StateDict, source: str) -> StateDict:
        tower = find_tower(state, "embeddings.patch_embeddings.projection.weight", source)
        if tower is None:
            raise WeightsError(f"{source}: no ViViT tower (no key ending in "
                               f"'embeddings.patch_embeddings.projection.weight'); keys look like {sorted(state)[:5]}")
        tower = rename_fragments(tower, LAYER_SPELLINGS, {k.removeprefix("vivit.") for k in self.state_dict()})
        return {"vivit." + k: v for k, v in tower.items()}
