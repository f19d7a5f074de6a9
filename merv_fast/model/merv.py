"""MERV assembled: frozen encoders -> visual path -> LLM. `build_model` is the package's front door."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from merv_fast.config import ModelConfig, apply_overrides, get_preset
from merv_fast.kernels import set_backend
from merv_fast.model.encoders import build_encoder
from merv_fast.model.llm import build_llm, llm_forward, splice_visual_tokens
from merv_fast.model.visual import VisualPath
from merv_fast.runtime.encoders import EncoderRunner, is_per_frame  # noqa: F401  (is_per_frame: its old home)


class MERV(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoders = nn.ModuleDict({e.name: build_encoder(e) for e in cfg.encoders})
        self.encoders.requires_grad_(False)
        self.encoder_runner = EncoderRunner(self.encoders, cfg.encoder_runtime)
        self.llm = build_llm(cfg.llm)
        if cfg.llm.fused_layer_kernels:
            from merv_fast.model.llama_kernels import apply_fused_llama_kernels
            apply_fused_llama_kernels(self.llm, cfg.llm.fused_layer_kernels)
        self.visual = build_visual_path(cfg, self.llm.config.hidden_size)

    # ------------------------------------------------------------------ properties
    @property
    def pool_size(self) -> tuple[int, int, int]:
        return self.visual.pool_size

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoders.eval()  # frozen: dropout and friends stay off whatever the trainer asks
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode(self, pixels: list[torch.Tensor], is_image: bool = False) -> list[torch.Tensor]:
        """Per-encoder inputs [B, T_e, 3, S, S] -> features [B, T_out, N, C], under no_grad (not inference_mode:
        the projectors save these tensors for backward), through the runner of `config.encoder_runtime`
        (sequential | streams | graph; merv_fast/runtime/encoders.py).

        An image is a static video. For the per-frame encoders, encoding one frame and tiling its features is exact,
        so they do that; the video encoders still see every repeated frame (each time step gets its own embedding).
        """
        return self.encoder_runner(pixels, is_image=is_image)

    def visual_tokens(self, features: list[torch.Tensor], grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Encoder features (one [B, T_e, N_e, C_e] per encoder, preset order) -> [B, T'*H'*W', D_llm]."""
        return self.visual(features, grids)

    def language_model_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               labels: torch.Tensor | None = None, visual: torch.Tensor | None = None,
                               **llm_kwargs: Any):
        """The LLM on text, with `visual` tokens [B, V, D] spliced in right after BOS when given, through the
        configured attention backend (`llm.attention`). `loss="fused"` (the trainer's, from `llm.loss`) computes the
        loss without logits; the default, transformers' loss, also returns the logits (see `llm_forward`)."""
        embeds, attention_mask, labels = self.spliced_inputs(input_ids, attention_mask, labels, visual)
        return llm_forward(self.llm, embeds, attention_mask, labels, **llm_kwargs)

    def spliced_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels: torch.Tensor | None, visual: torch.Tensor | None):
        """(embeddings, mask, labels) of the LLM's input: text embeddings with `visual` spliced in after BOS."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if visual is None:
            return embeds, attention_mask, labels
        prefix = 1 if self.config.llm.has_bos else 0
        return splice_visual_tokens(embeds, attention_mask, labels, visual.to(embeds.dtype), prefix_length=prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixels: list[torch.Tensor] | None = None,
                features: list[torch.Tensor] | None = None, is_image: bool = False, **llm_kwargs: Any):
        """Text-only when neither `pixels` nor `features` is given; else encoders -> visual path -> LLM."""
        if features is None and pixels is not None:
            features = self.encode(pixels, is_image=is_image)
        visual = self.visual_tokens(features) if features is not None else None
        return self.language_model_forward(input_ids, attention_mask, labels, visual, **llm_kwargs)

    # ------------------------------------------------------------------ release checkpoints
    def release_state_dict(self) -> dict[str, torch.Tensor]:
        from merv_fast.model.release import to_release_state_dict

        return to_release_state_dict(self)

    def load_release_state_dict(self, state_dict: dict[str, Any], source: str = "<state dict>") -> None:
        from merv_fast.model.release import load_release_state_dict

        load_release_state_dict(self, state_dict, source=source)


def visual_init_seed(cfg: ModelConfig) -> int | None:
    """`visual.init_seed` as a number ("release": the first encoder's width, as the release seeds it)."""
    seed = cfg.visual.init_seed
    return cfg.encoders[0].hidden_size if seed == "release" else seed


def build_visual_path(cfg: ModelConfig, llm_dim: int) -> VisualPath:
    """The visual path, its initial weights drawn from `visual.init_seed`'s own CPU stream when set: in the order the
    release's MERV constructor draws them (each projector, then the fusion), on the CPU as the release builds, then
    moved to the default device. The caller's random stream is left as it was."""
    seed = visual_init_seed(cfg)
    device = torch.get_default_device()
    if seed is None or device.type == "meta":
        return VisualPath(cfg, llm_dim=llm_dim)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        visual = VisualPath(cfg, llm_dim=llm_dim)
    return visual.to(device)


def build_model(preset: str = "tiny", *, config: ModelConfig | None = None, device: str | torch.device | None = None,
                encoder_dtype: torch.dtype | None = None, **overrides: Any) -> MERV:
    """Build MERV from a preset (or a ready `config`) plus dotted overrides (`llm__num_layers=4` or
    `**{"llm.num_layers": 4}`). Random init unless weights are configured. `device="meta"` builds without memory.

    Frozen encoders are cast to `encoder_dtype` (default: bf16 on CUDA, the model's dtype elsewhere).
    """
    cfg = apply_overrides(config if config is not None else get_preset(preset), overrides)
    set_backend(cfg.kernels)  # the configured default; MERV_FAST_KERNELS and use_backend() take precedence
    device = torch.device(device) if device is not None else torch.device("cpu")
    with device:
        model = MERV(cfg)
    if encoder_dtype is None and device.type == "cuda":
        encoder_dtype = torch.bfloat16
    if encoder_dtype is not None:
        model.encoders.to(encoder_dtype)
    model.train()
    return model
