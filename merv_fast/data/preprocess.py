"""Per-encoder preprocessing: sampled uint8 frames -> each encoder's normalised input.

Reads the spec's PreprocessSpec only (data/ knows nothing else of the model). Each encoder's config becomes an
`EncoderInputSpec` and the work goes to `merv_fast.kernels.preprocess.preprocess`: the fused native op for CPU
frames when merv_fast._C is usable (built, and for this torch), else the torch reference `preprocess_reference`,
which is this module's former code, unchanged in its results.
"""

from __future__ import annotations

from typing import Sequence

import torch

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
                                out_dtype=dtype if dtype in _OP_DTYPES else torch.float32, short_side=p.short_side,
                                letterbox_fill=tuple(int(m * 255) for m in p.mean) if p.letterbox else None)


def preprocess_all(frames: torch.Tensor, encoders: Sequence[EncoderConfig], frames_sampled: int,
                   flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Every encoder's input in one fused pass over the frames (see `preprocess_for_encoder`)."""
    b, t = frames.shape[:2]
    if t != frames_sampled:
        raise ValueError(f"expected {frames_sampled} sampled frames, got {t}")
    specs = [encoder_input_spec(e, frames_sampled, dtype) for e in encoders]
    outs = _op.preprocess(frames, specs, flip)
    return [o.reshape(b, e.frames, 3, e.image_size, e.image_size).to(dtype) for o, e in zip(outs, encoders)]


def _image_flag(is_image) -> bool:
    """`is_image` as one bool: a batch is single-modality (a Batch's per-sample bool tensor must agree)."""
    if isinstance(is_image, torch.Tensor):
        if is_image.numel() == 0:
            return False
        if bool(is_image.all()) != bool(is_image.any()):
            raise ValueError("a batch mixes images and videos: preprocess them separately")
        return bool(is_image.all())
    return bool(is_image)


def preprocess_batch(frames: torch.Tensor | list[torch.Tensor], encoders: Sequence[EncoderConfig],
                     frames_sampled: int, flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                     is_image: bool | torch.Tensor = False) -> list[torch.Tensor]:
    """A collated batch's frames -> per encoder [B, T_e, 3, S, S] in `dtype`, in the batch's sample order.

    `frames`: `Batch.frames`, i.e. uint8 [B, T, H, W, 3] when every sample has the same size, else a list of
    per-sample [T, H, W, 3] tensors. Samples are grouped by frame size and each group goes through ONE fused
    `preprocess` call; the results are scattered back into batch order (a single group is returned as is).

    Videos: T == frames_sampled. Images (`is_image`): T == 1, a static video (MERV_SPEC.md section 1); the one frame
    is preprocessed once and expanded along time to T_e. The result is an `expand` VIEW (stride 0 on the time axis):
    every time step is bit-identical to preprocessing the frame repeated `frames_sampled` times, since each frame is
    resized and normalised on its own. The encoders accept the view: MERV.encode feeds the per-frame encoders
    (DINOv2, SigLIP) `px[:, :1]` for images, and the video encoders copy it on `flatten(0, 1)` (LanguageBind) or
    inside the tubelet Conv3d (ViViT); tests/data/test_preprocess_batch.py checks that their features on the view
    equal those on a contiguous copy. Call `.contiguous()` before writing into it in place.

    `flip` (bool [B], batch order) mirrors each sample as in `preprocess_for_encoder` (LanguageBind only).
    """
    encoders = list(encoders)
    image = _image_flag(is_image)
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 5:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3] or a list of [T, H, W, 3], "
                             f"got {tuple(frames.shape)}")
        samples = None
        shapes = [tuple(frames.shape[1:])] * frames.shape[0]
    else:
        samples = list(frames)
        if not samples:
            raise ValueError("an empty list of frames")
        for i, f in enumerate(samples):
            if f.dim() != 4:
                raise ValueError(f"sample {i}: frames must be [T, H, W, 3], got {tuple(f.shape)}")
        shapes = [tuple(f.shape) for f in samples]
    b = len(shapes)
    want = 1 if image else frames_sampled
    for i, shape in enumerate(shapes):
        if shape[0] != want:
            kind = "an image needs 1 frame" if image else f"a video needs {frames_sampled} sampled frames"
            raise ValueError(f"sample {i}: {kind}, got {shape[0]}")
    if flip is not None and (flip.dim() != 1 or flip.shape[0] != b):
        raise ValueError(f"flip must be bool [B={b}], got {tuple(flip.shape)}")

    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)

    def run(x: torch.Tensor, f: torch.Tensor | None) -> list[torch.Tensor]:
        if not image:
            return preprocess_all(x, encoders, frames_sampled, f, dtype)
        # One frame, every encoder: the frame stride selects that frame whatever it is; [n, 1, 3, S, S] per encoder.
        specs = [encoder_input_spec(e, frames_sampled, dtype) for e in encoders]
        return [o.to(dtype) for o in _op.preprocess(x, specs, f)]

    if len(groups) == 1:
        x = frames if samples is None else (samples[0].unsqueeze(0) if b == 1 else torch.stack(samples))
        outs = run(x, flip)
    elif _writes_in_place(samples, image, dtype):
        outs = _preprocess_into_batch(samples, encoders, frames_sampled, flip, dtype)
    else:
        outs = None
        for idx in groups.values():
            x = torch.stack([samples[i] for i in idx])
            sub_flip = None if flip is None else flip[torch.tensor(idx, device=flip.device)]
            part = run(x, sub_flip)
            if outs is None:
                outs = [torch.empty((b, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in part]
            where = torch.tensor(idx, device=part[0].device)
            for o, p in zip(outs, part):
                o.index_copy_(0, where, p)
    if image:
        outs = [o.expand(-1, e.frames, -1, -1, -1) for o, e in zip(outs, encoders)]
    return outs


def _writes_in_place(samples: list[torch.Tensor], image: bool, dtype: torch.dtype) -> bool:
    """Mixed-size CPU videos with the native op usable: it can write each sample straight into its batch row."""
    return (not image and dtype in _OP_DTYPES and all(f.device.type == "cpu" for f in samples)
            and _op.native_reason() is None)


def _preprocess_into_batch(samples: list[torch.Tensor], encoders: Sequence[EncoderConfig], frames_sampled: int,
                           flip: torch.Tensor | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """Mixed frame sizes: the native op runs once per sample and writes into that sample's row of the batch outputs,
    so each output byte is written once (no per-size group stacked, preprocessed apart, then copied into place)."""
    specs = [encoder_input_spec(e, frames_sampled, dtype) for e in encoders]
    outs = [torch.empty((len(samples), e.frames, 3, e.image_size, e.image_size), dtype=dtype) for e in encoders]
    for i, frames in enumerate(samples):
        sample_flip = None if flip is None else flip[i:i + 1].cpu()
        _op.preprocess_native_out(frames.unsqueeze(0).contiguous(), specs, sample_flip, [o[i:i + 1] for o in outs])
    return outs
