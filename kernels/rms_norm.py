"""Llama's RMSNorm as one fused op: forward and backward Triton kernels, and the torch reference beside them.

The reference is transformers' `LlamaRMSNorm.forward`: the row's mean square in fp32, the normalised row rounded back
to the input's dtype, then multiplied by the weight (in the two dtypes' promoted type). The kernel keeps exactly those
roundings, so in bf16 it differs from the module only in the order of the fp32 sum. One read of x and one write of y
per row; the backward reads x, the output gradient and the saved per-row 1/rms once and writes the input gradient,
plus one fp32 partial weight gradient per program, summed in a fixed order (deterministic, no atomics).

`rms_norm` is the entry point: in eager mode the reference where `resolve_backend` says torch (bit-identical to the
module, transformers' autograd), else the custom op `merv_fast::rms_norm`. Under torch.compile always the custom op
(no graph break: the dispatch switch reads a ContextVar), which picks the Triton kernels or the same algebra in torch
when it runs. Triton is imported only when a kernel is first launched.
"""

from __future__ import annotations

import functools

import torch

from .aot import launch
from .dispatch import interpreter_enabled, resolve_backend

MAX_HIDDEN = 65536  # one row is one register tile; Llama widths stop far below this


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, round to x's dtype, scale by the weight."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (bodies compiled on first launch, `tl` bound then). A program owns BLOCK_M whole rows (BLOCK_N >= the
# width): the row sum needs the full row, and a Llama row (2048-8192 wide) fits one tile.
#   forward   r = 1/sqrt(mean(x^2) + eps);  n = round_to_x_dtype(x * r);  y = w * n
#   backward  dn = dy * w;  dx = r * (dn - (x*r) * mean(dn * x*r));  dw = sum over rows of dy * n
# (the rounding of n is a cast, which autograd passes through unchanged).
# ---------------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _triton_kernels()


def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, M, N, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 (12800 rows x 4096 x 2 bytes does not, 8x that does)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], (w[None, :] * normed).to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


def _rms_norm_backward_kernel(grad_y_ptr, x_ptr, w_ptr, rstd_ptr, grad_x_ptr, grad_w_partial_ptr,
                              stride_g, stride_x, stride_gx, M, N, rows_per_program,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_y_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        grad_w += tl.sum(g * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        grad_n = g * w[None, :]
        grad_x = rstd[:, None] * (grad_n - x_hat * (tl.sum(grad_n * x_hat, axis=1) / N)[:, None])
        tl.store(grad_x_ptr + rows[:, None] * stride_gx + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(grad_w_partial_ptr + pid.to(tl.int64) * N + cols, grad_w, mask=col_ok)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """(forward, backward) launchable kernels; imports triton on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_rms_norm_forward_kernel), triton.jit(_rms_norm_backward_kernel)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(rows: int, width: int) -> dict:
    """BLOCK_M x BLOCK_N and warps. On a GPU small widths share a program (tiles of about 4096 elements, enough bytes
    in flight per program); in the interpreter, where every program costs a fixed Python overhead, 16x that."""
    if width > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {width} is above the kernel's {MAX_HIDDEN}")
    block_n = _pow2_at_least(width)
    tile = 65536 if interpreter_enabled() else 4096
    block_m = max(1, min(_pow2_at_least(rows), tile // block_n))
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if not interpreter_enabled():
        meta["num_warps"] = min(16, max(4, block_m * block_n // 512))
    return meta


def _rows_view(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., N] as [M, N] with unit column stride (a view for the contiguous activations the model passes)."""
    flat = t.reshape(-1, width)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden states {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: hidden states on {x.device} but weight on {weight.device}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None,
                    rstd_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y like the reference's, 1/rms per row [M] in fp32). `out`/`rstd_out` may be passed (poisoned, in tests)."""
    _check(x, weight)
    width = x.shape[-1]
    rows = _rows_view(x, width)
    m = rows.shape[0]
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rstd_out is None:
        rstd_out = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, rstd_out
    out_rows = out.view(-1, width)
    forward, _ = _triton_kernels()
    meta = _blocks(m, width)
    launch(forward, (-(-m // meta["BLOCK_M"]),), rows, weight.contiguous(), out_rows, rstd_out, rows.stride(0),
                                         out_rows.stride(0), m, width, eps, **meta)
    return out, rstd_out


def _backward_programs(rows: int, block_m: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over (each then owns a long run of rows: few weight partials)."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(target, -(-rows // block_m)))


def rms_norm_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                             grad_x_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x in x's dtype, grad_weight in the weight's dtype)."""
    width = x.shape[-1]
    rows, grads = _rows_view(x, width), _rows_view(grad_y, width)
    m = rows.shape[0]
    if grad_x_out is None:
        grad_x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        return grad_x_out, torch.zeros_like(weight)
    grad_x_rows = grad_x_out.view(-1, width)
    _, backward = _triton_kernels()
    meta = _blocks(m, width)
    programs = _backward_programs(m, meta["BLOCK_M"], x.device)
    rows_per_program = -(-m // programs)
    programs = -(-m // rows_per_program)
    partial = torch.empty(programs, width, dtype=torch.float32, device=x.device)
    launch(backward, (programs,), grads, rows, weight.contiguous(), rstd, grad_x_rows, partial,
                          grads.stride(0), rows.stride(0), grad_x_rows.stride(0), m, width, rows_per_program, **meta)
    return grad_x_out, partial.sum(dim=0).to(weight.dtype)


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The custom op's torch engine: the reference's output and its 1/rms per row."""
    hidden = x.to(torch.float32)
    rstd = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (hidden * rstd).to(x.dtype)).contiguous(), rstd.reshape(-1)


def _backward_torch(grad_y, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's backward algebra in torch (custom-op implementations run below autograd: no autograd here)."""
    x_hat = x.to(torch.float32) * rstd.view(*x.shape[:-1], 1)
    grad_y = grad_y.to(torch.float32)
    grad_n = grad_y * weight.to(torch.float32)
    grad_x = rstd.view(*x.shape[:-1], 1) * (grad_n - x_hat * (grad_n * x_hat).mean(-1, keepdim=True))
    grad_w = (grad_y * x_hat.to(x.dtype).to(torch.float32)).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (traced through their fakes), each choosing Triton or torch when it runs.
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("merv_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend(x, weight) == "triton":
        return rms_norm_triton(x, weight, eps)
    return _forward_torch(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("merv_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend(grad_y, x, weight) == "triton":
        return rms_norm_backward_triton(grad_y, x, weight, rstd)
    return _backward_torch(grad_y, x, weight, rstd)


@_rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _rms_norm_backward_op(grad_y, x, weight, rstd)
    return grad_x, grad_w, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's output for hidden states x [..., N] and weight [N] (see the module docstring for the path)."""
    _check(x, weight)
    if not torch.compiler.is_compiling() and resolve_backend(x, weight) == "torch":
        return rms_norm_reference(x, weight, eps)
    return _rms_norm_op(x, weight, float(eps))[0]


def aot_launches(model) -> None:
    """The launches the LLM makes (kernels/aot.py records them on meta tensors): forward and backward of a norm."""
    x, weight = model.empty(model.batch, model.sequence, model.llm_hidden), model.empty(model.llm_hidden)
    y, rstd = rms_norm_triton(x, weight, 1e-5)
    rms_norm_backward_triton(y, x, weight, rstd)
