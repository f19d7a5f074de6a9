"""Per-encoder preprocessing: sampled uint8 frames -> each encoder's normalised input.

Reads the spec's PreprocessSpec only (data/ knows nothing else of the model). Each encoder's config becomes an
`EncoderInputSpec` and the work goes to `merv_fast.kernels.preprocess.preprocess`: the fused native op for CPU
frames when merv_fast._C is usable (built, and for this torch), else the torch reference `preprocess_reference`,
which is this module's former code, unchanged in its results.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from merv_fast import native
from merv_fast.config import EncoderConfig
from merv_fast.kernels import preprocess as _op

# The op file imports nothing from merv_fast; here it learns from the loader whether the native op may run (which
# also refuses a library built against another torch, with a one-line notice).
_op.set_native_check(lambda: native.op_reason("preprocess_frames"))
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    return preprocess_all(frames, [enc], frames_sampled, flip, dtype)[0]


def encoder_input_spec(enc: EncoderConfig, frames_sampled: int,
                       dtype: torch.dtype = torch.float32) -> _op.EncoderInputSpec:
    """The op's plain-value description of what `enc` wants from `frames_sampled` frames."""
    p = enc.preprocess
    return _op.EncoderInputSpec(size=enc.image_size, resize=p.resize, interpolation=p.interpolation,
                                antialias=p.antialias, mean=tuple(p.mean), std=tuple(p.std),
                                frame_stride=frame_stride(frames_sampled, enc), random_flip=p.random_flip,
                                out_dtype=dtype if dtype in _OP_DTYPES else torch.float32)


def preprocess_all(frames: torch.Tensor, encoders: Sequence[EncoderConfig], frames_sampled: int,
                   flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Every encoder's input in one fused pass over the frames (see `preprocess_for_encoder`)."""
    b, t = frames.shape[:2]
    if t != frames_sampled:
        raise ValueError(f"expected {frames_sampled} sampled frames, got {t}")
    specs = [encoder_input_spec(e, frames_sampled, dtype) for e in encoders]
    outs = _op.preprocess(frames, specs, flip)
    return [o.reshape(b, e.frames, 3, e.image_size, e.image_size).to(dtype) for o, e in zip(outs, encoders)]
