"""Fused per-encoder preprocessing (MERV_SPEC.md section 2): decoded uint8 frames -> every encoder's normalised input.

One `EncoderInputSpec` per encoder says what it wants: which frames (every `frame_stride`-th), an optional letterbox
pad to a square, the resize (squash to SxS, or short side to S (or `short_side`) then a center crop to S), the
filter, mean/std, an optional horizontal flip, the output dtype. `resize_geometry` is the one place the integer
geometry is computed (the native op mirrors it in kernels/csrc/preprocess.cpp).

- `preprocess_reference`: the torch ground truth (`F.interpolate`), one encoder at a time. The GPU (Triton) and the
  CPU (native) versions are both tested against it.
- `preprocess`: the native op `torch.ops.merv_fast.preprocess_frames` (kernels/csrc/preprocess.cpp) for CPU uint8
  frames when the native library is usable, else the reference. The op reads each frame once and writes every
  encoder's input from it, fp32 math; it matches the reference to < 1e-4 in normalised units for fp32 outputs
  (measured ~1e-6), and to one rounding step of the output dtype for bf16/fp16 (see tests/kernels/test_preprocess.py).

This file imports nothing from the rest of merv_fast: whether the native op may be used is asked through
`native_check`, which merv_fast wires to `merv_fast.native` (the library's loader and torch-version check).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("squash", "short_side_crop", "resize_crop")
INTERPOLATIONS = ("bilinear", "bicubic")
# The op's integer codes for the spec's strings and dtypes (kernels/csrc/preprocess.cpp reads the same tables).
_RESIZE_CODE = {"squash": 0, "short_side_crop": 1, "resize_crop": 2}
_INTERP_CODE = {"bilinear": 0, "bicubic": 1}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclasses.dataclass(frozen=True)
class EncoderInputSpec:
    """One encoder's input, as plain values: frames[:, ::frame_stride] -> [B, T_e, 3, size, size] in out_dtype."""

    size: int
    # "squash" (both sides to `size`) | "short_side_crop" (LanguageBind's ShortSideScale to `size`, center crop) |
    # "resize_crop" (torchvision's Resize(short side) to `short_side` or `size`, center crop to `size`)
    resize: str
    interpolation: str  # "bilinear" | "bicubic"
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_stride: int = 1
    random_flip: bool = False  # mirror the samples whose `flip` flag is set (LanguageBind); others ignore `flip`
    out_dtype: torch.dtype = torch.float32
    layout: str = "TCHW"  # the only layout so far: [B, T_e, 3, S, S]
    short_side: int = 0  # resize_crop: the short side before the crop (0: `size`)
    letterbox_fill: tuple[int, int, int] | None = None  # pad to a square with this uint8 colour first

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.out_dtype not in _DTYPE_CODE:
            raise ValueError(f"out_dtype {self.out_dtype} is not one of {list(_DTYPE_CODE)}")
        if self.layout != "TCHW":
            raise ValueError(f"layout {self.layout!r}: only 'TCHW' is implemented")
        if self.size < 1 or self.frame_stride < 1:
            raise ValueError(f"size ({self.size}) and frame_stride ({self.frame_stride}) must be positive")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        if self.short_side and (self.resize != "resize_crop" or self.short_side < self.size):
            raise ValueError(f"short_side {self.short_side}: only resize_crop takes one, at least size {self.size}")
        if self.letterbox_fill is not None and (len(self.letterbox_fill) != 3 or self.resize == "squash"
                                                 or not all(0 <= v <= 255 for v in self.letterbox_fill)):
            raise ValueError(f"letterbox_fill {self.letterbox_fill}: three uint8 values, with a cropping resize")


def letterbox_padding(h: int, w: int) -> tuple[int, int]:
    """(vertical, horizontal) padding on EACH side of the release's LetterboxPad: int((max - side) / 2), so an odd
    difference leaves the padded frame one pixel short of square (base_video.py:34-43)."""
    side = max(h, w)
    return int((side - h) / 2), int((side - w) / 2)


def short_side_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of short_side_crop: LanguageBind's ShortSideScale (the long side is
    floor((long / short) * size), in that order of operations: processing_video.py:33-60), then torchvision's
    CenterCropVideo offsets int(round((new - size) / 2.0)) with Python's round, so an odd excess d rounds d / 2 half
    to even (d = 3 -> 2, d = 5 -> 2): NOT always the floor."""
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def resize_crop_geometry(h: int, w: int, short: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of torchvision's Resize(short) (the long side int(short * long / short_side), its
    _compute_resized_output_size) and CenterCrop(size) (the same offsets as above)."""
    small, large = (w, h) if w <= h else (h, w)
    new_small, new_large = short, int(short * large / small)
    new_w, new_h = (new_small, new_large) if w <= h else (new_large, new_small)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def resize_geometry(h: int, w: int, spec: EncoderInputSpec) -> tuple[int, int, int, int, int, int]:
    """(pad_top, pad_left, new_h, new_w, top, left) for an H x W frame: letterbox padding on each side, the resized
    size of the padded frame, and the crop's offsets in it."""
    pad_top, pad_left = letterbox_padding(h, w) if spec.letterbox_fill is not None else (0, 0)
    h, w = h + 2 * pad_top, w + 2 * pad_left
    if spec.resize == "squash":
        return pad_top, pad_left, spec.size, spec.size, 0, 0
    if spec.resize == "short_side_crop":
        return (pad_top, pad_left, *short_side_geometry(h, w, spec.size))
    return (pad_top, pad_left, *resize_crop_geometry(h, w, spec.short_side or spec.size, spec.size))


def resize_reference(x: torch.Tensor, spec: EncoderInputSpec) -> torch.Tensor:
    """x float [N, 3, H, W] in [0, 1] -> [N, 3, S, S] (align_corners=False, antialias as the spec says)."""
    size = spec.size
    pad_top, pad_left, new_h, new_w, top, left = resize_geometry(x.shape[-2], x.shape[-1], spec)
    if spec.letterbox_fill is not None:
        n, c, h, w = x.shape
        fill = torch.tensor(spec.letterbox_fill, dtype=x.dtype, device=x.device).div(255.0).view(1, 3, 1, 1)
        padded = fill.expand(n, c, h + 2 * pad_top, w + 2 * pad_left).clone()
        padded[..., pad_top:pad_top + h, pad_left:pad_left + w] = x
        x = padded
    x = F.interpolate(x, size=(new_h, new_w), mode=spec.interpolation, antialias=spec.antialias,
                      align_corners=False)
    return x[..., top:top + size, left:left + size]


def _check_inputs(frames: torch.Tensor, specs: Sequence[EncoderInputSpec], flip: torch.Tensor | None) -> None:
    if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if flip is not None and (flip.dim() != 1 or flip.shape[0] != frames.shape[0]):
        raise ValueError(f"flip must be bool [B={frames.shape[0]}], got {tuple(flip.shape)}")
    if not specs:
        raise ValueError("no encoder specs")


def preprocess_reference(frames: torch.Tensor, specs: Sequence[EncoderInputSpec],
                         flip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """frames uint8 [B, T, H, W, 3] -> per spec [B, T_e, 3, S, S], T_e = ceil(T / frame_stride). The ground truth.

    Per spec: frames[:, ::frame_stride], /255, the letterbox pad, `F.interpolate` (align_corners=False, antialias per
    spec; the sizes and crop as `resize_geometry` says), mirror the samples with flip[b] set (only where the spec has
    random_flip), then (x - mean) / std in fp32 and a cast to out_dtype.

    Relation to the release: LanguageBind's transforms resize tensors with torchvision's bilinear without antialias,
    which is this exactly. DINOv2, ViViT and SigLIP went through PIL's `Image.resize` on uint8 images; torch's
    antialias=True bilinear/bicubic uses PIL's filters (triangle, and cubic with a = -0.5) with PIL's support
    (filter radius times the downscale factor) and normalisation, but in float on the unrounded image, where PIL
    rounds each pass's result to uint8, clipping to [0, 255]. Measured (tests/kernels/test_preprocess.py::
    test_reference_vs_pil, natural-looking frames to 224x224, in [0, 1] units): wherever PIL's clipping cannot act,
    the difference is PIL's rounding only, max 0.99/255 (bilinear) and 1.08/255 (bicubic); at hard edges the cubic
    filter overshoots and PIL clips (also after its first pass, whose axis it picks) while torch does not: up to
    18/255 there.
    """
    _check_inputs(frames, specs, flip)
    b = frames.shape[0]
    outs = []
    for spec in specs:
        picked = frames[:, ::spec.frame_stride]
        t_e = picked.shape[1]
        x = picked.reshape(b * t_e, *picked.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
        x = resize_reference(x, spec).reshape(b, t_e, 3, spec.size, spec.size)
        if spec.random_flip and flip is not None:
            x = torch.where(flip.to(device=x.device, dtype=torch.bool).view(b, 1, 1, 1, 1), x.flip(-1), x)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 1, 3, 1, 1)
        outs.append(((x - mean) / std).to(spec.out_dtype).contiguous())
    return outs


# ----------------------------------------------------------------------------------------------- native dispatch
def _op_registered() -> str | None:
    """The default check, for use without merv_fast: the op is there if someone loaded the library."""
    if hasattr(torch.ops, "merv_fast") and hasattr(torch.ops.merv_fast, "preprocess_frames"):
        return None
    return "torch.ops.merv_fast.preprocess_frames is not registered (the native library is not loaded)"


# None when the native op may run, else why not. merv_fast sets it to its loader's check (which also refuses a
# library built against another torch); a test may set it to simulate a missing library.
native_check: Callable[[], str | None] = _op_registered


def set_native_check(check: Callable[[], str | None]) -> Callable[[], str | None]:
    """Install the check that `preprocess` asks before it runs the native op; returns the previous one."""
    global native_check
    previous, native_check = native_check, check
    return previous


def native_reason() -> str | None:
    return native_check()


def _op_args(specs: Sequence[EncoderInputSpec]) -> tuple:
    return ([s.size for s in specs], [_RESIZE_CODE[s.resize] for s in specs],
            [_INTERP_CODE[s.interpolation] for s in specs], [s.antialias for s in specs],
            [float(v) for s in specs for v in s.mean], [float(v) for s in specs for v in s.std],
            [s.frame_stride for s in specs], [s.random_flip for s in specs], [_DTYPE_CODE[s.out_dtype] for s in specs],
            [s.short_side or s.size for s in specs],
            [v for s in specs for v in (s.letterbox_fill if s.letterbox_fill is not None else (-1, -1, -1))])


def output_shapes(frames_shape: Sequence[int], specs: Sequence[EncoderInputSpec]) -> list[tuple[int, ...]]:
    b, t = frames_shape[:2]
    return [(b, -(-t // s.frame_stride), 3, s.size, s.size) for s in specs]


def preprocess_native_out(frames: torch.Tensor, specs: Sequence[EncoderInputSpec], flip: torch.Tensor | None,
                          out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The native op writing into caller-given contiguous outputs (a test hook: poisoned buffers, reused memory)."""
    _check_inputs(frames, specs, flip)
    flip_arg = None if flip is None else flip.to(torch.bool).contiguous()
    torch.ops.merv_fast.preprocess_frames_out(frames, *_op_args(specs), flip_arg, out)
    return out


def preprocess(frames: torch.Tensor, specs: Sequence[EncoderInputSpec],
               flip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """frames uint8 [B, T, H, W, 3] -> per spec [B, T_e, 3, S, S]: the native op where it can run, else the reference."""
    _check_inputs(frames, specs, flip)
    if frames.device.type == "cpu" and native_check() is None:
        flip_arg = None if flip is None else flip.to(torch.bool).contiguous()
        return list(torch.ops.merv_fast.preprocess_frames(frames, *_op_args(specs), flip_arg))
    return preprocess_reference(frames, specs, flip)


# ----------------------------------------------------------------------------------------------- Triton dispatch
_preprocess_cpu = preprocess


def preprocess(frames: torch.Tensor, specs: Sequence[EncoderInputSpec],
               flip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """As above, but the Triton kernel (kernels/preprocess_triton.py) where `resolve_backend` picks triton: CUDA
    frames, or CPU frames under TRITON_INTERPRET=1. CPU frames without the interpreter never ask (a data worker must
    not fail because MERV_FAST_KERNELS=triton was set for the model's kernels)."""
    from .dispatch import interpreter_enabled, resolve_backend

    if (frames.is_cuda or interpreter_enabled()) and resolve_backend(frames) == "triton":
        from .preprocess_triton import preprocess_triton

        return preprocess_triton(frames, specs, flip)
    return _preprocess_cpu(frames, specs, flip)
