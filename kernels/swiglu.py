"""Llama's gated MLP activation, silu(gate) * up, as one fused op: forward and backward Triton kernels, and the torch
reference beside them.

The reference is what `LlamaMLP.forward` computes between its projections: `act_fn(gate_proj(x)) * up_proj(x)` with
act silu. The kernel keeps its two roundings (silu's output in the activation dtype, then the product), so in bf16 and
fp16 it matches the module's elementwise ops up to the last bit of the sigmoid. Forward: reads gate and up once,
writes the product; nothing but gate and up is saved for backward (autograd through the reference also keeps
silu(gate), a third tensor of the MLP's widest shape). Backward: one pass writes both input gradients.

`swiglu` is the entry point: in eager mode the reference where `resolve_backend` says torch, else the custom op
`merv_fast::swiglu`; under torch.compile always the custom op, which picks Triton or the same algebra in torch when it
runs (as kernels/rms_norm.py). Triton is imported only when a kernel is first launched.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .aot import launch
from .dispatch import interpreter_enabled, resolve_backend


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels over the flattened elements (bodies compiled on first launch, `tl` bound then).
#   forward   s = round(gate * sigmoid(gate));  out = s * up
#   backward  d_up = d_out * s;  d_gate = d_out * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
# ---------------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _triton_kernels()


def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _swiglu_backward_kernel(grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = (gate * sig).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(grad_up_ptr + offsets, (grad * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)
    grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """(forward, backward) launchable kernels; imports triton on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_swiglu_forward_kernel), triton.jit(_swiglu_backward_kernel)


def _launch(kernel, numel: int, *args) -> None:
    # 1024 elements (4 warps, 8 per thread) per GPU program; the interpreter pays per program, so it gets big blocks.
    block = 1 << 16 if interpreter_enabled() else 1024
    meta = {} if interpreter_enabled() else {"num_warps": 4}
    launch(kernel, (max(1, -(-numel // block)),), *args, numel, BLOCK=block, **meta)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} on {gate.device} and up "
                         f"{tuple(up.shape)} {up.dtype} on {up.device} must match in shape, dtype and device")


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up; `out` (contiguous, gate's shape and dtype) may be passed, poisoned in tests."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    if out is None:
        out = torch.empty_like(gate)
    forward, _ = _triton_kernels()
    _launch(forward, gate.numel(), gate, up, out)
    return out


def swiglu_backward_triton(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                           grad_gate_out: torch.Tensor | None = None,
                           grad_up_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up), contiguous, in gate's dtype."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    if grad_gate_out is None:
        grad_gate_out = torch.empty_like(gate)
    if grad_up_out is None:
        grad_up_out = torch.empty_like(up)
    _, backward = _triton_kernels()
    _launch(backward, gate.numel(), grad_out, gate, up, grad_gate_out, grad_up_out)
    return grad_gate_out, grad_up_out


def _backward_torch(grad_out, gate, up) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's backward algebra in torch (custom-op implementations run below autograd)."""
    gate32 = gate.to(torch.float32)
    sig = torch.sigmoid(gate32)
    grad_up = grad_out * (gate32 * sig).to(gate.dtype)
    grad_gate = grad_out.to(torch.float32) * up.to(torch.float32) * sig * (1 + gate32 * (1 - sig))
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


@torch.library.custom_op("merv_fast::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if resolve_backend(gate, up) == "triton":
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up).contiguous()


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("merv_fast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend(grad_out, gate, up) == "triton":
        return swiglu_backward_triton(grad_out, gate, up)
    grad_gate, grad_up = _backward_torch(grad_out, gate, up)
    return grad_gate.contiguous(), grad_up.contiguous()


@_swiglu_backward_op.register_fake
def _(grad_out, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(grad_out, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (see the module docstring for which path runs)."""
    _check(gate, up)
    if not torch.compiler.is_compiling() and resolve_backend(gate, up) == "torch":
        return swiglu_reference(gate, up)
    return _swiglu_op(gate, up)


def aot_launches(model) -> None:
    """The launches the LLM's MLP makes (kernels/aot.py records them on meta tensors): forward and backward."""
    gate = model.empty(model.batch, model.sequence, model.llm_intermediate)
    out = swiglu_triton(gate, torch.empty_like(gate))
    swiglu_backward_triton(out, gate, torch.empty_like(gate))
