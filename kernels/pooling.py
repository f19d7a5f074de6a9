"""Spatio-temporal pooling of encoder features to one grid (MERV_SPEC.md section 3), for one encoder or all at once.

The torch reference is the release's computation: view [B, T, H*W, C] as [B, C, T, H, W], `adaptive_avg_pool3d`,
flatten frame-major to [B, T'*H'*W', C]. PyTorch's adaptive windows are start = floor(i*n/m),
end = ceil((i+1)*n/m): exact 2x2 means for 16 -> 8, overlapping windows of 2 and 3 for 14 -> 8.

`pool_concat` pools every encoder into its column block of one [B, L, sum C_e] buffer and also returns the mean of
the POOLED tokens per column (the fusion's key input, MERV_SPEC.md section 4). It is the custom op
`merv_fast::pool_concat` (forward and backward Triton kernels below, or the torch reference, as `resolve_backend`
decides when it runs). Triton is imported only when a Triton kernel is first launched.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .aot import launch
from .dispatch import interpreter_enabled, resolve_backend


def adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows as half-open [start, end) ranges."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def pool_reference(features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """features [B, T, H*W, C] (any strides) -> pooled [B, T'*H'*W', C], in the input's dtype."""
    b, t, n, c = features.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} cells but the features have {n} tokens per step")
    x = features.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return F.adaptive_avg_pool3d(x, size).flatten(2).transpose(1, 2).contiguous()


def square_grid(num_tokens: int) -> tuple[int, int]:
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens per step do not form a square grid; pass grids=(H, W) explicitly")
    return (side, side)


def pool(features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """One encoder's pooled tokens [B, T'*H'*W', C]: the Triton kernel when `resolve_backend` picks it."""
    if resolve_backend(features) == "triton":
        return pool_concat([features], [grid], size)[0]
    return pool_reference(features, grid, size)


# ---------------------------------------------------------------------------------------------------------------------
# All encoders at once: pooled tokens concatenated along channels, plus the per-column mean of the pooled tokens.
# ---------------------------------------------------------------------------------------------------------------------


def _checked_inputs(features, grids, size) -> tuple[int, int, list[int]]:
    """(batch, pooled tokens L, channel offsets), after checking what every path relies on (ValueError if not)."""
    if len(features) == 0:
        raise ValueError("pool_concat needs at least one encoder's features")
    if len(grids) != len(features):
        raise ValueError(f"{len(features)} encoders' features but {len(grids)} grids")
    if len(size) != 3:
        raise ValueError(f"size must be (T', H', W'), got {tuple(size)}")
    dtypes = {f.dtype for f in features}
    if len(dtypes) != 1:
        raise ValueError(f"all encoders' features must share one dtype (the output's), got {sorted(map(str, dtypes))}")
    devices = {f.device for f in features}
    if len(devices) != 1:
        raise ValueError(f"all encoders' features must be on one device, got {sorted(map(str, devices))}")
    batch = features[0].shape[0]
    offsets = [0]
    for e, (f, (h, w)) in enumerate(zip(features, grids)):
        if f.dim() != 4:
            raise ValueError(f"encoder {e}: features must be [B, T, H*W, C], got shape {tuple(f.shape)}")
        if f.shape[0] != batch:
            raise ValueError(f"encoder {e}: batch {f.shape[0]} differs from encoder 0's {batch}")
        if h * w != f.shape[2]:
            raise ValueError(f"encoder {e}: grid {(h, w)} has {h * w} cells but the features have {f.shape[2]} "
                             f"tokens per step")
        offsets.append(offsets[-1] + f.shape[3])
    return batch, size[0] * size[1] * size[2], offsets


def pool_concat_reference(features: list[torch.Tensor], grids: list[tuple[int, int]],
                          size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """features[e] [B, T_e, H_e*W_e, C_e] -> (pooled [B, L, K], means [B, K]), K = sum C_e, L = T'*H'*W'.

    Encoder e owns columns [sum_{d<e} C_d, ... + C_e) of `pooled`; `means` is the mean over the L POOLED tokens (the
    fusion's key input), which on overlapping windows is not the raw tokens' mean.
    """
    _checked_inputs(features, grids, size)
    pooled = torch.cat([pool_reference(f, tuple(g), tuple(size)) for f, g in zip(features, grids)], dim=-1)
    return pooled, pooled.mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. Triton is imported only when they are first launched (`_triton_kernels`), so importing merv_fast
# never needs it: the kernel bodies below are plain functions until then, and `tl` is bound at that moment.
#
# Forward, one program per (channel block, run of output frames t' (one on a GPU), sample b). For each input frame t
# in the temporal window of t' it reads the frame's H*W x BLOCK_C tile once, in chunks of BLOCK_N tokens, and
# accumulates all H'*W' windows of the frame at once as a matrix product with the 0/1 membership matrix
# inside[q, n] = (token n lies in window q). The 0/1 entries are exact in every dtype, so fp16/bf16 tiles go through
# tensor cores with exact products and fp32 accumulation; fp32 tiles use an IEEE dot (no TF32). Dividing by the
# window volume happens once, in fp32, at the end. Overlapping spatial windows cost no extra read (one tile feeds
# every window); overlapping temporal windows (T' not dividing T) re-read the shared frame, from L2 on a GPU.
# ---------------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _triton_kernels() before the kernel bodies are compiled


def _pool_forward_kernel(
    x_ptr, out_ptr, token_sums_ptr,
    stride_xb, stride_xt, stride_xn, stride_xc,
    stride_ob, stride_ol, stride_ok,
    stride_sb, stride_st, stride_sk,
    T, H, W, C, T_OUT, H_OUT, W_OUT, col_offset, frames_per_program,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_c = tl.program_id(0)
    first_t_out = tl.program_id(1) * frames_per_program
    b = tl.program_id(2).to(tl.int64)  # 64-bit base offsets: B*T*N*C can pass 2**31 at large batches

    # The frame's output windows q = i*W_OUT + j and their [start, end) rows and columns (PyTorch's adaptive windows).
    q = tl.arange(0, BLOCK_Q)
    q_valid = q < H_OUT * W_OUT
    i = q // W_OUT
    j = q % W_OUT
    h_lo = (i * H) // H_OUT
    h_hi = ((i + 1) * H + H_OUT - 1) // H_OUT
    w_lo = (j * W) // W_OUT
    w_hi = ((j + 1) * W + W_OUT - 1) // W_OUT
    cells = ((h_hi - h_lo) * (w_hi - w_lo)).to(tl.float32)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    x_base = x_ptr + b * stride_xb + c[None, :] * stride_xc
    out_base = out_ptr + b * stride_ob + (col_offset + c[None, :]) * stride_ok
    out_mask = q_valid[:, None] & c_valid[None, :]

    for t_out in range(first_t_out, tl.minimum(first_t_out + frames_per_program, T_OUT)):
        t_start = (t_out * T) // T_OUT
        t_end = ((t_out + 1) * T + T_OUT - 1) // T_OUT
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for n0 in range(0, H * W, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            h = n // W
            w = n % W
            # Padded windows (q >= H_OUT*W_OUT) have h_lo >= H: they contain no token and need no mask of their own.
            inside = ((h[None, :] >= h_lo[:, None]) & (h[None, :] < h_hi[:, None])
                      & (w[None, :] >= w_lo[:, None]) & (w[None, :] < w_hi[:, None]))
            if DOT_IN_FP32:
                inside = inside.to(tl.float32)
            else:
                inside = inside.to(x_ptr.dtype.element_ty)
            x_ptrs = x_base + n[:, None] * stride_xn
            x_mask = (n < H * W)[:, None] & c_valid[None, :]
            for t in range(t_start, t_end):  # one membership matrix serves every frame of the temporal window
                x = tl.load(x_ptrs + t * stride_xt, mask=x_mask, other=0.0)
                if DOT_IN_FP32:
                    acc = tl.dot(inside, x.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(inside, x, acc)

        pooled = acc / (cells * (t_end - t_start))[:, None]
        out_rows = t_out * H_OUT * W_OUT + q
        tl.store(out_base + out_rows[:, None] * stride_ol, pooled.to(out_ptr.dtype.element_ty), mask=out_mask)
        # This frame's share of the token mean, summed in a fixed order (no atomics): the launcher adds the T' shares.
        frame_sum = tl.sum(tl.where(out_mask, pooled, 0.0), axis=0)
        tl.store(token_sums_ptr + b * stride_sb + t_out * stride_st + (col_offset + c) * stride_sk, frame_sum,
                 mask=c_valid)


# Backward, one program per (channel block, run of input frames, sample b): a gather, so every input gradient is
# written by exactly one program (deterministic, no atomics). d x[t, n, c] = sum over the windows (t', q) that contain
# (t, n) of g[t', q, c] / volume(t', q), with g = grad_pooled + grad_means / L. The spatial membership does not depend
# on t', so for each frame t the program first folds the temporal windows containing t into
# G[q, c] = sum_t' g[t', q, c] / (frames(t') * cells(q)), then each chunk of BLOCK_N tokens is one product
# inside^T[n, q] @ G[q, c] with fp32 accumulation. G is not exact in half precision, so the product's inputs are TF32
# (tensor cores; the 0/1 matrix is exact, G keeps 10 of its 23 mantissa bits) when the gradient is stored in fp16 or
# bf16, whose own rounding (11 and 8 bits) is as coarse or coarser, and IEEE fp32 (FMA) for fp32 gradients. The
# FMA form is compute-bound: 2 * BLOCK_Q = 128 FLOPs per element written (2 bytes in bf16) is 64 FLOP/B, above an
# H100's fp32-FMA ridge of 67 TFLOP/s / 3.35 TB/s = 20 FLOP/B, and below its TF32 tensor-core ridge of ~150 FLOP/B.
def _pool_backward_kernel(
    grad_pooled_ptr, grad_means_ptr, grad_x_ptr,
    stride_gb, stride_gl, stride_gk,
    stride_mb, stride_mk,
    stride_xb, stride_xt, stride_xn, stride_xc,
    T, H, W, C, T_OUT, H_OUT, W_OUT, col_offset, inv_tokens, frames_per_program,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TF32_PRODUCT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    first_t = tl.program_id(1) * frames_per_program
    b = tl.program_id(2).to(tl.int64)

    q = tl.arange(0, BLOCK_Q)
    q_valid = q < H_OUT * W_OUT
    i = q // W_OUT
    j = q % W_OUT
    h_lo = (i * H) // H_OUT
    h_hi = ((i + 1) * H + H_OUT - 1) // H_OUT
    w_lo = (j * W) // W_OUT
    w_hi = ((j + 1) * W + W_OUT - 1) // W_OUT
    cells = ((h_hi - h_lo) * (w_hi - w_lo)).to(tl.float32)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    tile_mask = q_valid[:, None] & c_valid[None, :]
    grad_mean = tl.load(grad_means_ptr + b * stride_mb + (col_offset + c) * stride_mk, mask=c_valid, other=0.0)
    grad_mean_per_token = grad_mean.to(tl.float32) * inv_tokens
    g_base = grad_pooled_ptr + b * stride_gb + (col_offset + c[None, :]) * stride_gk

    for t in range(first_t, tl.minimum(first_t + frames_per_program, T)):
        # Temporal windows containing t: start(t') <= t < end(t') <=> floor(t*T'/T) <= t' <= ceil((t+1)*T'/T) - 1.
        folded = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for t_out in range((t * T_OUT) // T, ((t + 1) * T_OUT - 1) // T + 1):
            frames = ((t_out + 1) * T + T_OUT - 1) // T_OUT - (t_out * T) // T_OUT
            g = tl.load(g_base + (t_out * H_OUT * W_OUT + q)[:, None] * stride_gl, mask=tile_mask, other=0.0)
            folded += tl.where(tile_mask, g.to(tl.float32) + grad_mean_per_token[None, :], 0.0) / frames
        folded = folded / cells[:, None]

        x_base = grad_x_ptr + b * stride_xb + t * stride_xt + c[None, :] * stride_xc
        for n0 in range(0, H * W, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            h = n // W
            w = n % W
            inside_t = ((h[:, None] >= h_lo[None, :]) & (h[:, None] < h_hi[None, :])
                        & (w[:, None] >= w_lo[None, :]) & (w[:, None] < w_hi[None, :]))
            if TF32_PRODUCT:
                grad_x = tl.dot(inside_t.to(tl.float32), folded, input_precision="tf32")
            else:
                grad_x = tl.dot(inside_t.to(tl.float32), folded, input_precision="ieee")
            tl.store(x_base + n[:, None] * stride_xn, grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=(n < H * W)[:, None] & c_valid[None, :])


# One config in the interpreter (each extra config is a full interpreted run); a small autotune list on CUDA. Both
# kernels only store (no accumulation into their outputs), so re-running a launch while autotuning is harmless.
# In the interpreter each operation has a fixed cost of tens of microseconds and tl.dot runs as a slow non-BLAS NumPy
# loop, so blocks are sized to the shape (no padding to spare: 7x9 grids get 64-token chunks, 17 channels a block
# of 32) with several frames per program. On a GPU one frame per program gives B*T'*C/BLOCK_C programs, enough to
# fill the machine at batch 1 (16 output frames times 10-18 channel blocks per encoder at merv-7b widths).
_INTERPRETER_MAX_BLOCK_N = 256
_INTERPRETER_MAX_BLOCK_C = 128
_INTERPRETER_FRAMES_PER_PROGRAM = 8
_AUTOTUNE_KEY = ["C", "H", "W", "T", "T_OUT", "BLOCK_Q"]


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


# (BLOCK_N, BLOCK_C, warps, stages) per kernel: only configs that compile without register spills on sm_90 and sm_80
# at the model's shapes (`merv-fast kernels check`). The forward holds the [64, BLOCK_C] fp32 windows accumulator and
# the [64, BLOCK_N] membership matrix; the backward the folded [64, BLOCK_C] gradient and a [BLOCK_N, BLOCK_C] result.
_FORWARD_CONFIGS = [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3)]
_BACKWARD_CONFIGS = [(64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 4), (64, 32, 4, 3), (128, 64, 8, 2)]


def _cuda_configs(triton, table):
    return [triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=warps, num_stages=stages)
            for n, c, warps, stages in table]


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """(forward, backward) launchable kernels; imports triton on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    forward = triton.jit(_pool_forward_kernel)
    backward = triton.jit(_pool_backward_kernel)
    if not interpreter_enabled():
        forward = triton.autotune(_cuda_configs(triton, _FORWARD_CONFIGS), key=_AUTOTUNE_KEY)(forward)
        backward = triton.autotune(_cuda_configs(triton, _BACKWARD_CONFIGS), key=_AUTOTUNE_KEY)(backward)
    return forward, backward


def _launch(kernel, tokens: int, channels: int, frames: int, batch: int, *args, **constexprs) -> None:
    """Launch over (channel blocks, runs of `frames` frames, batch); the fixed config unless autotuning picks one."""
    if interpreter_enabled():
        frames_per_program = _INTERPRETER_FRAMES_PER_PROGRAM
        meta = {"BLOCK_N": min(_pow2_at_least(tokens), _INTERPRETER_MAX_BLOCK_N),
                "BLOCK_C": min(_pow2_at_least(channels), _INTERPRETER_MAX_BLOCK_C)}
    else:
        frames_per_program, meta = 1, {}

    def grid(chosen):
        return (-(-channels // chosen["BLOCK_C"]), -(-frames // frames_per_program), batch)

    launch(kernel, grid, *args, frames_per_program, **constexprs, **meta)


def _window_block(size) -> int:
    """Output windows per frame, padded to a power of two and to tl.dot's minimum of 16."""
    return _pow2_at_least(size[1] * size[2])


def pool_concat_triton(features: list[torch.Tensor], grids: list[tuple[int, int]], size: tuple[int, int, int], *,
                       pooled_out: torch.Tensor | None = None,
                       token_sums_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `pool_concat`: one launch per encoder into one [B, L, K] buffer, then the means.

    pooled_out [B, L, K] (features' dtype) and token_sums_out [B, T', K] (float32, each output frame's column sums)
    may be passed in, as tests do with poisoned buffers to prove that every element is written.
    """
    batch, tokens, offsets = _checked_inputs(features, grids, size)
    t_out, h_out, w_out = size
    ref = features[0]
    if pooled_out is None:
        pooled_out = torch.empty(batch, tokens, offsets[-1], dtype=ref.dtype, device=ref.device)
    if token_sums_out is None:
        token_sums_out = torch.empty(batch, t_out, offsets[-1], dtype=torch.float32, device=ref.device)
    forward, _ = _triton_kernels()
    # The interpreter has no bf16 arithmetic: there bf16 tiles are widened to fp32 before the product.
    dot_in_fp32 = ref.dtype == torch.float32 or (ref.dtype == torch.bfloat16 and interpreter_enabled())
    for x, (h, w), col_offset in zip(features, grids, offsets):
        t, c = x.shape[1], x.shape[3]
        _launch(forward, h * w, c, t_out, batch,
                x, pooled_out, token_sums_out, *x.stride(), *pooled_out.stride(), *token_sums_out.stride(),
                t, h, w, c, t_out, h_out, w_out, col_offset,
                BLOCK_Q=_window_block(size), DOT_IN_FP32=dot_in_fp32)
    # T' fp32 partial sums per column, added in a fixed order: deterministic, unlike atomic adds.
    means = (token_sums_out.sum(dim=1) / tokens).to(ref.dtype)
    return pooled_out, means


def pool_concat_backward_triton(grad_pooled: torch.Tensor, grad_means: torch.Tensor, shapes: list[tuple[int, ...]],
                                grids: list[tuple[int, int]], size: tuple[int, int, int], *,
                                grads_out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Gradients [B, T_e, H_e*W_e, C_e] of every encoder's features (grad_pooled's dtype) for the Triton path.

    grads_out may be passed in (poisoned buffers in tests); otherwise they are allocated contiguous.
    """
    t_out, h_out, w_out = size
    tokens = t_out * h_out * w_out
    if grads_out is None:
        grads_out = [torch.empty(shape, dtype=grad_pooled.dtype, device=grad_pooled.device) for shape in shapes]
    _, backward = _triton_kernels()
    col_offset = 0
    for grad_x, (h, w) in zip(grads_out, grids):
        batch, t, _, c = grad_x.shape
        _launch(backward, h * w, c, t, batch,
                grad_pooled, grad_means, grad_x, *grad_pooled.stride(), *grad_means.stride(), *grad_x.stride(),
                t, h, w, c, t_out, h_out, w_out, col_offset, 1.0 / tokens,
                BLOCK_Q=_window_block(size), TF32_PRODUCT=grad_pooled.dtype in (torch.float16, torch.bfloat16))
        col_offset += c
    return grads_out


def pool_concat_backward_reference(grad_pooled: torch.Tensor, grad_means: torch.Tensor,
                                   shapes: list[tuple[int, ...]], grids: list[tuple[int, int]],
                                   size: tuple[int, int, int]) -> list[torch.Tensor]:
    """The gradient of `pool_concat_reference`, by PyTorch's own adaptive-average-pooling backward (the formula its
    autograd uses; called directly because custom-op implementations run below autograd)."""
    tokens = size[0] * size[1] * size[2]
    grads, offset = [], 0
    for (b, t, n, c), (h, w) in zip(shapes, grids):
        block = slice(offset, offset + c)
        g = grad_pooled[..., block] + grad_means[:, None, block] / tokens  # [B, L, C]
        g = g.transpose(1, 2).reshape(b, c, *size)
        grad = torch.ops.aten._adaptive_avg_pool3d_backward(g, g.new_empty(b, c, t, h, w))
        grads.append(grad.permute(0, 2, 3, 4, 1).reshape(b, t, n, c).contiguous())
        offset += c
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (traced through their fake implementations, no graph breaks), each choosing the
# Triton kernels or the torch reference when it runs. Grids travel flattened ([H_1, W_1, H_2, W_2, ...]) and the
# backward gets the features' shapes, never their values (nothing but shapes is saved for backward).
# ---------------------------------------------------------------------------------------------------------------------


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]


@torch.library.custom_op("merv_fast::pool_concat", mutates_args=())
def _pool_concat_op(features: list[torch.Tensor], grids: list[int],
                    size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs, size3 = _pairs(grids), tuple(size)
    if resolve_backend(*features) == "triton":
        return pool_concat_triton(features, pairs, size3)
    return pool_concat_reference(features, pairs, size3)


@_pool_concat_op.register_fake
def _(features, grids, size):
    batch, tokens, offsets = _checked_inputs(features, _pairs(grids), size)
    ref = features[0]
    return ref.new_empty(batch, tokens, offsets[-1]), ref.new_empty(batch, offsets[-1])


@torch.library.custom_op("merv_fast::pool_concat_backward", mutates_args=())
def _pool_concat_backward_op(grad_pooled: torch.Tensor, grad_means: torch.Tensor, shapes: list[int],
                             grids: list[int], size: list[int]) -> list[torch.Tensor]:
    shapes4 = [tuple(shapes[k:k + 4]) for k in range(0, len(shapes), 4)]
    if resolve_backend(grad_pooled, grad_means) == "triton":
        return pool_concat_backward_triton(grad_pooled, grad_means, shapes4, _pairs(grids), tuple(size))
    return pool_concat_backward_reference(grad_pooled, grad_means, shapes4, _pairs(grids), tuple(size))


@_pool_concat_backward_op.register_fake
def _(grad_pooled, grad_means, shapes, grids, size):
    return [grad_pooled.new_empty(shapes[k:k + 4]) for k in range(0, len(shapes), 4)]


def _setup_context(ctx, inputs, output):
    features, grids, size = inputs
    ctx.shapes = [d for f in features for d in f.shape]
    ctx.grids, ctx.size = grids, size


def _backward(ctx, grad_pooled, grad_means):
    grads = _pool_concat_backward_op(grad_pooled, grad_means, ctx.shapes, ctx.grids, ctx.size)
    return grads, None, None


_pool_concat_op.register_autograd(_backward, setup_context=_setup_context)


def pool_concat(features: list[torch.Tensor], grids: list[tuple[int, int]],
                size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All encoders pooled into one [B, L, sum C_e] buffer, and the per-column mean of the pooled tokens [B, K].

    Runs the Triton kernels or the torch reference as `resolve_backend(*features)` decides, through the
    `merv_fast::pool_concat` custom op (differentiable, traceable by torch.compile without graph breaks).
    """
    _checked_inputs(features, grids, size)
    return _pool_concat_op(list(features), [d for g in grids for d in g], list(size))


def aot_launches(model) -> None:
    """The launches the model makes (kernels/aot.py records them on meta tensors): every encoder's features pooled
    into the concatenated buffer, and their gradient."""
    features = [model.empty(model.batch, e.time_steps, e.grid[0] * e.grid[1], e.channels) for e in model.encoders]
    grids = [e.grid for e in model.encoders]
    pooled, means = pool_concat_triton(features, grids, model.pool_size)
    pool_concat_backward_triton(pooled, means, [tuple(f.shape) for f in features], grids, model.pool_size)
