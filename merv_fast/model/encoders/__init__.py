"""The four frozen visual encoders. `build_encoder(cfg)` is the one way to make one (weights loaded when configured)."""

from __future__ import annotations

from merv_fast.config import ConfigError, EncoderConfig
from merv_fast.model.encoders.base import Encoder, WeightsError, load_encoder_weights, read_checkpoint
from merv_fast.model.encoders.dinov2 import Dinov2Encoder
from merv_fast.model.encoders.languagebind import LanguageBindEncoder
from merv_fast.model.encoders.siglip import SiglipEncoder
from merv_fast.model.encoders.vivit import VivitEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "languagebind": LanguageBindEncoder,
    "dinov2": Dinov2Encoder,
    "vivit": VivitEncoder,
    "siglip": SiglipEncoder,
}


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build on the current default device (works under `torch.device("meta")`), then load `cfg.weights` if set."""
    if cfg.name not in ENCODERS:
        raise ConfigError(f"unknown encoder {cfg.name!r}; encoders are {sorted(ENCODERS)}")
    encoder = ENCODERS[cfg.name](cfg)
    load_encoder_weights(encoder, cfg)
    return encoder


__all__ = ["ENCODERS", "Encoder", "WeightsError", "build_encoder", "load_encoder_weights", "read_checkpoint",
           "Dinov2Encoder", "LanguageBindEncoder", "SiglipEncoder", "VivitEncoder"]
