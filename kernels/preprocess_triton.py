"""The GPU path of the fused per-encoder preprocessing: uint8 frames [B, T, H, W, 3] -> every encoder's input.

Matches `preprocess_reference` (kernels/preprocess.py): per `EncoderInputSpec`, frames[:, ::frame_stride], a resize
exactly like `F.interpolate(align_corners=False)` (bilinear or bicubic, with or without antialias; sizes, crop and
letterbox pad as `resize_geometry` says), the optional per-sample horizontal flip, (x/255 - mean) / std,
stored as [B, T_e, 3, S, S] in the spec's out_dtype.

Every one of these resizes is separable and linear: resized = Wv @ frame @ Wh^T per channel, with Wv [S, H] and
Wh [S, W] banded matrices whose rows hold torch's filter taps (the center crop just drops rows of the uncropped
matrices). The host computes the taps once per (frame size, spec geometry), in float64, and keeps them on the device
as dense fp32 matrices plus each output row's/column's band of source indices [lo, hi) (`_resize_tables`).

Kernel: one program per (sample, output frame and colour channel, output column tile, output row tile). It
takes the union of its rows' source bands and of its columns' source bands, and walks that source window in chunks:
for each chunk of source columns it gathers the uint8 pixels of every band row chunk, applies the vertical weights
(v = Wv[rows, band] @ pixels), then the horizontal ones (acc += v @ Wh^T[band, cols]); both products are fp32 with
IEEE fp32 products (no TF32: tf32 weights would cost ~1e-3 relative). Normalisation is folded into one multiply-add
(acc * 1/(255 std) - mean/std) before the store in the output dtype. The flip mirrors which output column a tile
column takes (column S-1-j of the resized image), so a flipped sample costs nothing extra.

One launch per spec, each reading the frames that spec takes: frames are not read once for all specs (the specs'
sizes, tiles and dtypes differ, and a per-spec launch keeps the kernel simple). Each tile reads only its source
window, so a spec reads each of its frames about once plus the filter margins that neighbouring tiles share (~10-25%
at 32x32 tiles). Work per output pixel grows with the downscale factor (the dense band chunks hold zeros outside each
row's taps): cheap for frames up to ~2x the output size, a few times more for 1080p.

Triton is imported only when the kernel is first launched.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .aot import launch
from .dispatch import interpreter_enabled
from .preprocess import EncoderInputSpec, _check_inputs, output_shapes, resize_geometry

# ---------------------------------------------------------------------------------------------------------------------
# Host side: torch's resize filters as matrices.
# ---------------------------------------------------------------------------------------------------------------------


def _cubic_inner(x: float, a: float) -> float:  # |x| < 1
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_outer(x: float, a: float) -> float:  # 1 <= |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def resize_matrix(n_in: int, n_out: int, interpolation: str, antialias: bool) -> np.ndarray:
    """float64 [n_out, n_in]: row i holds the weights `F.interpolate(size=n_out, align_corners=False)` gives the input
    samples for output sample i, along one axis (the 2-D resize is this matrix applied to both axes).

    Without antialias this is torch's upsample_{bilinear,bicubic}2d: source coordinate scale * (i + 0.5) - 0.5
    (clamped at 0 for bilinear), 2 taps, or 4 taps of the cubic convolution with a = -0.75, indices clamped to the
    edge (clamped taps add up on the edge sample). With antialias it is torch's _upsample_*_aa (PIL's filters): the
    triangle or the cubic with a = -0.5, stretched by the downscale factor when downscaling, over the input samples
    whose centers lie within the support of center scale * (i + 0.5), normalised to sum 1.
    """
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        if antialias:
            radius = 1.0 if interpolation == "bilinear" else 2.0
            support = radius * scale if scale >= 1.0 else radius
            invscale = 1.0 / scale if scale >= 1.0 else 1.0
            center = scale * (i + 0.5)
            # int() truncates toward zero as torch's static_cast does (the clamp at 0 makes the sign moot).
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            taps = []
            for j in range(lo, hi):
                x = abs((j - center + 0.5) * invscale)
                if interpolation == "bilinear":
                    taps.append(1.0 - x if x < 1.0 else 0.0)
                else:
                    taps.append(_cubic_inner(x, -0.5) if x < 1.0 else _cubic_outer(x, -0.5) if x < 2.0 else 0.0)
            total = sum(taps)
            for j, w in zip(range(lo, hi), taps):
                m[i, j] += w / total if total != 0.0 else w
        elif interpolation == "bilinear":
            src = max(scale * (i + 0.5) - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            lam = min(max(src - i0, 0.0), 1.0)
            m[i, i0] += 1.0 - lam
            m[i, i0 + (1 if i0 < n_in - 1 else 0)] += lam
        else:
            src = scale * (i + 0.5) - 0.5
            first = int(np.floor(src))
            t = src - first
            taps = [_cubic_outer(t + 1, -0.75), _cubic_inner(t, -0.75), _cubic_inner(1 - t, -0.75),
                    _cubic_outer(2 - t, -0.75)]
            for k, w in enumerate(taps):
                m[i, min(max(first - 1 + k, 0), n_in - 1)] += w
    return m


def _bands(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output sample, the half-open range [lo, hi) of input samples with a nonzero weight."""
    nonzero = m != 0.0
    lo = nonzero.argmax(axis=1)
    hi = m.shape[1] - nonzero[:, ::-1].argmax(axis=1)
    return lo.astype(np.int32), hi.astype(np.int32)


@functools.lru_cache(maxsize=256)
def _host_tables(h: int, w: int, spec: EncoderInputSpec):
    """(Wv [S, H], Wh^T [W, S], row_lo, row_hi, col_lo, col_hi, fill share [S, S]) for one frame size and spec
    geometry, on the host. With a letterbox the matrices are made over the padded frame and keep only the real
    samples' columns; the pad's constant then reaches output pixel (r, j) with weight
    total_r * total_j - real_r * real_j (the fill share; None without a letterbox)."""
    pad_top, pad_left, new_h, new_w, top, left = resize_geometry(h, w, spec)
    size = spec.size
    wv = resize_matrix(h + 2 * pad_top, new_h, spec.interpolation, spec.antialias)[top:top + size]
    wh = resize_matrix(w + 2 * pad_left, new_w, spec.interpolation, spec.antialias)[left:left + size]
    share = None
    if spec.letterbox_fill is not None:
        wv_real, wh_real = wv[:, pad_top:pad_top + h], wh[:, pad_left:pad_left + w]
        share = np.outer(wv.sum(1), wh.sum(1)) - np.outer(wv_real.sum(1), wh_real.sum(1))
        wv, wh = wv_real, wh_real
        share = np.ascontiguousarray(share, dtype=np.float32)
    row_lo, row_hi = _bands(wv)
    col_lo, col_hi = _bands(wh)
    # Wh is stored transposed: the kernel loads [source column chunk, output column tile] blocks of it.
    return (np.ascontiguousarray(wv, dtype=np.float32), np.ascontiguousarray(wh.T, dtype=np.float32),
            row_lo, row_hi, col_lo, col_hi, share)


_device_tables: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _resize_tables(h: int, w: int, spec: EncoderInputSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The tables on `device`, made once per (frame size, geometry, device) and kept: a few hundred KB each.

    Made with blocking copies from pageable memory, so they are complete before any stream uses them (the
    prefetcher launches on a side stream; the tables are shared by every stream after that).
    """
    geometry = dataclasses.replace(spec, mean=(0.0,) * 3, std=(1.0,) * 3, frame_stride=1, random_flip=False,
                                   out_dtype=torch.float32)  # only what the tables depend on
    key = (h, w, geometry, str(device))
    tables = _device_tables.get(key)
    if tables is None:
        host = _host_tables(h, w, geometry)
        tables = tuple(None if a is None else torch.from_numpy(a).to(device) for a in host)
        _device_tables[key] = tables
    return tables


# ---------------------------------------------------------------------------------------------------------------------
# The kernel. The body is a plain function until `_triton_kernel()` binds `tl` and jit-compiles it.
# ---------------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _triton_kernel() before the kernel body is compiled


def _preprocess_kernel(
    frames_ptr, out_ptr, flip_ptr,
    wv_ptr, wh_ptr, row_lo_ptr, row_hi_ptr, col_lo_ptr, col_hi_ptr, share_ptr,
    stride_fb, stride_ft, stride_fh, stride_fw, stride_fc,
    stride_ob, stride_ot, stride_oc, stride_oh, stride_ow,
    H, W, S, T_OUT, frame_stride,
    scale0, scale1, scale2, shift0, shift1, shift2, fill0, fill1, fill2,
    HAS_FLIP: tl.constexpr, HAS_FILL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KR: tl.constexpr, BLOCK_KC: tl.constexpr,
):
    # Axis 0: sample, output frame and colour channel (the large axis goes first: axes 1 and 2 stop at 65535). One
    # channel per program keeps two fp32 tiles live (v and acc) instead of six: no register spills at 64-wide tiles.
    pid_n = tl.program_id(0)
    channel = pid_n % 3
    b = pid_n // (3 * T_OUT)
    t_out = (pid_n // 3) % T_OUT
    # 64-bit base offsets: B*T*H*W*3 passes 2**31 for a batch of long high-resolution clips.
    frame = (frames_ptr + b.to(tl.int64) * stride_fb + (t_out * frame_stride).to(tl.int64) * stride_ft
             + channel * stride_fc)

    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = r < S
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_valid = j < S
    if HAS_FLIP:
        # A flipped sample's output column j is column S-1-j of the resized image: take that column's weights.
        flipped = tl.load(flip_ptr + b) != 0
        src_col = tl.where(flipped, S - 1 - j, j)
    else:
        src_col = j

    # The tile's source window: the union of its rows' and columns' bands (padding rows/columns take no part).
    row_lo = tl.min(tl.load(row_lo_ptr + r, mask=r_valid, other=H), axis=0)
    row_hi = tl.max(tl.load(row_hi_ptr + r, mask=r_valid, other=0), axis=0)
    col_lo = tl.min(tl.load(col_lo_ptr + src_col, mask=j_valid, other=W), axis=0)
    col_hi = tl.max(tl.load(col_hi_ptr + src_col, mask=j_valid, other=0), axis=0)

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(col_lo, col_hi, BLOCK_KC):
        k = k0 + tl.arange(0, BLOCK_KC)
        k_valid = k < W
        # Columns of the chunk outside some output column's band have weight 0 in Wh (it is dense), so the chunk may
        # overrun the bands freely; only reads past the frame's edge need masking.
        wh = tl.load(wh_ptr + k[:, None] * S + src_col[None, :], mask=k_valid[:, None] & j_valid[None, :], other=0.0)
        v = tl.zeros((BLOCK_R, BLOCK_KC), dtype=tl.float32)
        for h0 in range(row_lo, row_hi, BLOCK_KR):
            h = h0 + tl.arange(0, BLOCK_KR)
            h_valid = h < H
            wv = tl.load(wv_ptr + r[:, None] * H + h[None, :], mask=r_valid[:, None] & h_valid[None, :], other=0.0)
            x = tl.load(frame + h[:, None] * stride_fh + k[None, :] * stride_fw,
                        mask=h_valid[:, None] & k_valid[None, :], other=0).to(tl.float32)
            v = tl.dot(wv, x, v, input_precision="ieee")
        acc = tl.dot(v, wh, acc, input_precision="ieee")

    if HAS_FILL:  # the letterbox pad's constant, by the filter's share outside the real frame
        share = tl.load(share_ptr + r[:, None] * S + src_col[None, :], mask=r_valid[:, None] & j_valid[None, :],
                        other=0.0)
        acc += tl.where(channel == 0, fill0, tl.where(channel == 1, fill1, fill2)) * share

    # (x/255 - mean) / std as one multiply-add, with this channel's constants.
    scale = tl.where(channel == 0, scale0, tl.where(channel == 1, scale1, scale2))
    shift = tl.where(channel == 0, shift0, tl.where(channel == 1, shift1, shift2))
    out = (out_ptr + b.to(tl.int64) * stride_ob + t_out.to(tl.int64) * stride_ot + channel * stride_oc
           + r[:, None] * stride_oh + j[None, :] * stride_ow)
    tl.store(out, (acc * scale + shift).to(out_ptr.dtype.element_ty), mask=r_valid[:, None] & j_valid[None, :])


# One small config in the interpreter (every extra config is a full interpreted run); a short autotune list on CUDA.
# The kernel only stores, so the autotuner's repeated launches are harmless. Tiles of at least 16 (tl.dot's minimum).
_INTERPRETER_META = {"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_KR": 32, "BLOCK_KC": 32}
_AUTOTUNE_KEY = ["H", "W", "S"]


def _cuda_configs(triton):
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c, "BLOCK_KR": kr, "BLOCK_KC": kc}, num_warps=warps,
                          num_stages=stages)
            for r, c, kr, kc, warps, stages in _CUDA_CONFIGS]


# (BLOCK_R, BLOCK_C, BLOCK_KR, BLOCK_KC, warps, stages): the configs that compile without register spills on sm_90
# and sm_80 with triton 3.6 and 3.9 (`merv-fast kernels check`); the IEEE fp32 products keep their operands in
# registers, so 64-tall row tiles take 16-deep band chunks (32-deep ones spill), no chunk is 64 deep, and 2 warps
# or 32x64 tiles at 4 warps spill under triton 3.6, and so does a 3-stage pipeline of 32x32 tiles with 16-deep chunks
# on sm_80 (4 B, the letterbox variant).
_CUDA_CONFIGS = [(32, 32, 32, 32, 4, 2), (32, 32, 16, 32, 4, 2), (64, 64, 16, 32, 8, 2), (64, 32, 16, 32, 4, 2)]


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """The launchable kernel; imports triton on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    kernel = triton.jit(_preprocess_kernel)
    if not interpreter_enabled():
        kernel = triton.autotune(_cuda_configs(triton), key=_AUTOTUNE_KEY)(kernel)
    return kernel


def preprocess_triton(frames: torch.Tensor, specs: list[EncoderInputSpec], flip: torch.Tensor | None = None, *,
                      out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """frames uint8 [B, T, H, W, 3] (CUDA, or CPU under TRITON_INTERPRET=1; any strides) -> per spec
    [B, T_e, 3, S, S] in the spec's out_dtype, as `preprocess_reference` computes it (one launch per spec, on the
    current stream).

    `out` may give the output buffers (one per spec, that shape and dtype, any strides): tests pass NaN-filled ones
    to prove that every element is written.
    """
    _check_inputs(frames, specs, flip)
    batch, _, h, w, _ = frames.shape
    shapes = output_shapes(frames.shape, specs)
    if out is None:
        out = [torch.empty(shape, dtype=spec.out_dtype, device=frames.device) for shape, spec in zip(shapes, specs)]
    elif len(out) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(out)} output buffers")
    for buf, shape, spec in zip(out, shapes, specs):
        if tuple(buf.shape) != shape or buf.dtype != spec.out_dtype or buf.device != frames.device:
            raise ValueError(f"output buffer {buf.dtype} {tuple(buf.shape)} on {buf.device} does not match "
                             f"{spec.out_dtype} {shape} on {frames.device}")
    flip_dev = None
    if flip is not None and any(spec.random_flip for spec in specs):
        flip_dev = flip.to(device=frames.device, dtype=torch.uint8)

    kernel = _triton_kernel()
    meta = dict(_INTERPRETER_META) if interpreter_enabled() else {}
    for spec, buf in zip(specs, out):
        *tables, share = _resize_tables(h, w, spec, frames.device)
        has_flip = spec.random_flip and flip_dev is not None
        fills = [float(v) for v in spec.letterbox_fill] if share is not None else [0.0] * 3
        t_out, size = buf.shape[1], spec.size
        # (x/255 - mean) / std as one fp32 multiply-add per element.
        scales = [1.0 / (255.0 * s) for s in spec.std]
        shifts = [-m / s for m, s in zip(spec.mean, spec.std)]

        def grid(chosen, size=size, t_out=t_out):
            return (batch * t_out * 3, -(-size // chosen["BLOCK_C"]), -(-size // chosen["BLOCK_R"]))

        launch(kernel, grid, frames, buf, flip_dev if has_flip else frames, *tables,
               share if share is not None else tables[0], *frames.stride(), *buf.stride(),
               h, w, size, t_out, spec.frame_stride, *scales, *shifts, *fills,
               HAS_FLIP=has_flip, HAS_FILL=share is not None, **meta)
    return out


def aot_launches(model) -> None:
    """The launch the data pipeline makes (kernels/aot.py records it on meta tensors): decoded uint8 frames of
    `model.frame_size` into every encoder's input, LanguageBind's flip included; and the same with the letterbox
    strategy (`visual.image_resize_strategy=letterbox`), whose pad fill compiles another variant (HAS_FILL)."""
    frames = model.empty(model.batch, model.frames_sampled, *model.frame_size, 3, dtype=torch.uint8)
    flip = model.empty(model.batch, dtype=torch.bool)
    preprocess_triton(frames, list(model.input_specs), flip)
    letterboxed = [dataclasses.replace(spec, resize="resize_crop", letterbox_fill=(127, 127, 127))
                   for spec in model.input_specs]
    preprocess_triton(frames, letterboxed, flip)
