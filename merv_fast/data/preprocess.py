"""Per-encoder preprocessing, torch reference: sampled uint8 frames -> each encoder's normalised input.

Reads the spec's PreprocessSpec only (data/ knows nothing else of the model). The fused native/GPU versions
of the data-pipeline issue are tested against this.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from merv_fast.config import EncoderConfig


def frame_stride(frames_sampled: int, enc: EncoderConfig) -> int:
    """Each encoder takes every (frames_sampled / its_frames)-th sampled frame: 16 of 32 -> 0, 2, ..., 30."""
    return frames_sampled // enc.frames


def resize_frames(x: torch.Tensor, enc: EncoderConfig) -> torch.Tensor:
    """x float [N, 3, H, W] in [0, 1] -> [N, 3, S, S] as the encoder's spec says."""
    spec, size = enc.preprocess, enc.image_size
    if spec.resize == "squash":
        return F.interpolate(x, size=(size, size), mode=spec.interpolation, antialias=spec.antialias,
                             align_corners=False)
    if spec.resize == "short_side_crop":
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, int(h * scale)), max(size, int(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode=spec.interpolation, antialias=spec.antialias,
                          align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return x[..., top:top + size, left:left + size]
    raise ValueError(f"encoder {enc.name!r}: unknown resize mode {spec.resize!r}")


def preprocess_for_encoder(frames: torch.Tensor, enc: EncoderConfig, frames_sampled: int,
                           flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """frames uint8 [B, frames_sampled, H, W, 3] -> [B, T_e, 3, S, S] normalised, in `dtype`.

    `flip` (bool [B]) mirrors chosen samples horizontally where the encoder's spec asks for random flips; the
    caller draws it from (seed, epoch, sample id) so that results never depend on worker RNG state.
    """
    b, t = frames.shape[:2]
    if t != frames_sampled:
        raise ValueError(f"expected {frames_sampled} sampled frames, got {t}")
    picked = frames[:, :: frame_stride(frames_sampled, enc)]
    x = picked.reshape(-1, *picked.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
    x = resize_frames(x, enc).reshape(b, enc.frames, 3, enc.image_size, enc.image_size)
    if enc.preprocess.random_flip and flip is not None:
        x = torch.where(flip.view(b, 1, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(enc.preprocess.mean, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(enc.preprocess.std, device=x.device).view(1, 1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def preprocess_all(frames: torch.Tensor, encoders: Sequence[EncoderConfig], frames_sampled: int,
                   flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [preprocess_for_encoder(frames, e, frames_sampled, flip, dtype) for e in encoders]
