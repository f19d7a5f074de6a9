"""Triton kernels for the fused projection + fusion op (`project_fuse.py` holds the op, its autograd and its torch
reference). Imported only when the Triton path runs, so importing merv_fast never needs triton.

Notation (MERV_SPEC.md section 4): pooled [B, L, K] holds every encoder's pooled tokens side by side, weight [D, K]
every projector side by side, scales [B, K] the per-sample fusion weight of each column's encoder (mix[b, e(k)]).
  forward            out[b]        = (pooled[b] * scales[b]) @ weight^T + bias_mix[b]
  weight gradient    grad_w        = sum_b (dY_b^T pooled_b) * scales[b]            (scaled per column k)
  mix gradient       mix_cols[b,k] = sum_d (dY_b^T pooled_b)[d, k] * weight[d, k]   (summed per encoder by the caller)
  pooled gradient    grad_p[b]     = (dY_b @ weight) * scales[b]
Every kernel loads half-precision inputs, accumulates in fp32 and rounds once on store. fp32 inputs use IEEE fp32
dots: Triton's default for fp32 on tensor cores is TF32, ten mantissa bits, far from the fp32 reference.

TMA (USE_TMA): on sm_90 and newer every tile is copied by the Tensor Memory Accelerator through tensor descriptors
made in the kernel (`tl.make_tensor_descriptor`), where the pointer variant computes an address per element and
masks the edges; the descriptor fills what lies outside the tensor with zeros, as the masks do. Same tiles, same
products in the same order (in the interpreter the products' bits are equal). `uses_tma` picks it per launch: the
pointer variant on sm_80, on CPU, and for tensors a descriptor cannot address. With no per-element addresses in
registers the TMA variant also compiles wider tiles spill-free, so its autotuner is offered more configs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import launch
from .dispatch import TMA_MIN_ARCH, interpreter_enabled, target_arch, tma_allowed, tma_compatible


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs need IEEE fp32 dots; the interpreter has no bf16 arithmetic (its bf16 dot returns garbage), so
    # there bf16 tiles are converted first. fp16 keeps its native dot everywhere, so the interpreter runs the same
    # code path as the GPU for it.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


def uses_tma(*tensors: torch.Tensor) -> bool:
    """The TMA variant where the launch is built for sm_90 or newer and a descriptor may address every tensor the
    kernel copies (16-byte aligned base and strides, innermost stride 1), unless `MERV_FAST_TMA=0`; the pointer
    variant otherwise."""
    arch = target_arch(tensors[0])
    return (arch is not None and arch >= TMA_MIN_ARCH and tma_allowed()
            and all(tma_compatible(t) for t in tensors))


# Poisoning: tests set this so that outputs start as NaN and an element a kernel forgot to write fails the test.
POISON_OUTPUTS = False


def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _configs(shapes: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)
            for *blocks, warps, stages in shapes]


def _tuned(kernel, cuda_configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None):
    """Autotuned on a GPU; in the interpreter one fixed config (passed at the call) keeps the tests fast."""
    if interpreter_enabled():
        return kernel
    return triton.autotune(configs=cuda_configs, key=key, reset_to_zero=reset_to_zero)(kernel)


# One config per kernel in the interpreter: 64 wide tiles, so the tests' odd shapes still span several tiles.
_INTERPRETER_BLOCKS = 64


# ---------------------------------------------------------------------------------------------------------------
# Forward: out[b, l, d] = sum_k pooled[b, l, k] * scales[b, k] * weight[d, k] + bias_mix[b, d]
# Grid: (L tiles * D tiles, B). Within a sample, consecutive programs walk down L for a fixed D tile (groups of
# GROUP_L tiles), so one weight tile serves several programs from L2 while the sample's pooled rows stay there too.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(pooled_ptr, scales_ptr, weight_ptr, bias_mix_ptr, out_ptr,
                    L, K, D,
                    stride_pb, stride_pl, stride_pk,
                    stride_wd, stride_wk,
                    stride_ob, stride_ol, stride_od,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_L: tl.constexpr, DOT_IN_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_l = tl.cdiv(L, BLOCK_L)
    num_d = tl.cdiv(D, BLOCK_D)
    programs_per_group = GROUP_L * num_d
    first_l = (pid // programs_per_group) * GROUP_L
    group_size = tl.minimum(num_l - first_l, GROUP_L)
    pid_l = first_l + (pid % programs_per_group) % group_size
    pid_d = (pid % programs_per_group) // group_size

    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < L
    col_ok = cols < D
    pooled_rows = pooled_ptr + batch * stride_pb + rows[:, None] * stride_pl
    scales_row = scales_ptr + batch * K
    if USE_TMA:  # this sample's [L, K] rows, the [D, K] weight and this sample's [L, D] output
        pooled_desc = tl.make_tensor_descriptor(pooled_ptr + batch * stride_pb, [L, K], [stride_pl, 1],
                                                [BLOCK_L, BLOCK_K])
        weight_desc = tl.make_tensor_descriptor(weight_ptr, [D, K], [stride_wd, 1], [BLOCK_D, BLOCK_K])
        out_desc = tl.make_tensor_descriptor(out_ptr + batch * stride_ob, [L, D], [stride_ol, 1],
                                             [BLOCK_L, BLOCK_D])

    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if USE_TMA:
            a = pooled_desc.load([pid_l * BLOCK_L, k0])
            w = weight_desc.load([pid_d * BLOCK_D, k0]).T
        else:
            a = tl.load(pooled_rows + ks[None, :] * stride_pk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wd,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.load(scales_row + ks, mask=k_ok, other=0.0)
        # The fusion weight of each column's encoder, applied while the tile is in registers: no scaled copy.
        a = a.to(tl.float32) * s[None, :]
        if DOT_IN_FP32:
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(weight_ptr.dtype.element_ty), w, acc)

    acc += tl.load(bias_mix_ptr + batch * D + cols, mask=col_ok, other=0.0)[None, :]
    if USE_TMA:  # rows and columns past the output's edge are not written
        out_desc.store([pid_l * BLOCK_L, pid_d * BLOCK_D], acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + batch * stride_ob + rows[:, None] * stride_ol + cols[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_L, BLOCK_D, BLOCK_K, warps, stages), per variant (USE_TMA). 64x128 and 64x256 tiles at 4 warps spill on
# sm_80 under triton 3.6 (`merv-fast kernels check`): the pointer variant does not offer them; the TMA variant, with
# no per-element addresses in registers, compiles them spill-free on sm_90 with triton 3.6 and 3.9.
_FORWARD_CONFIGS = {False: [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                            (64, 64, 32, 4, 4)]}
_FORWARD_CONFIGS[True] = _FORWARD_CONFIGS[False] + [(64, 128, 64, 4, 4), (64, 256, 64, 4, 4)]
_forward_tuned = {use_tma: _tuned(_forward_kernel, _configs(shapes, ("BLOCK_L", "BLOCK_D", "BLOCK_K")),
                                  key=["L", "K", "D", "DOT_IN_FP32", "USE_TMA"])
                  for use_tma, shapes in _FORWARD_CONFIGS.items()}


def forward(pooled: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, bias_mix: torch.Tensor) -> torch.Tensor:
    """pooled [B, L, K] (any strides), scales [B, K] fp32, weight [D, K], bias_mix [B, D] fp32 -> out [B, L, D]."""
    b, length, k = pooled.shape
    d = weight.shape[0]
    scales, bias_mix = scales.contiguous(), bias_mix.contiguous()
    out = _new_output((b, length, d), pooled.dtype, pooled.device)
    args = (pooled, scales, weight, bias_mix, out, length, k, d, *pooled.stride(), *weight.stride(), *out.stride())
    flags = dict(GROUP_L=8, DOT_IN_FP32=_dot_in_fp32(pooled.dtype), USE_TMA=uses_tma(pooled, weight, out))
    if interpreter_enabled():
        blocks = dict(BLOCK_L=_INTERPRETER_BLOCKS, BLOCK_D=_INTERPRETER_BLOCKS, BLOCK_K=_INTERPRETER_BLOCKS)
        grid = (triton.cdiv(length, blocks["BLOCK_L"]) * triton.cdiv(d, blocks["BLOCK_D"]), b)
        launch(_forward_kernel, grid, *args, **blocks, **flags)
    else:
        def grid(meta):
            return (triton.cdiv(length, meta["BLOCK_L"]) * triton.cdiv(d, meta["BLOCK_D"]), b)
        launch(_forward_tuned[flags["USE_TMA"]], grid, *args, **flags)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Weight and mix gradients in one pass. Grid: (K tiles, D tiles). Each program owns one [BLOCK_D, BLOCK_K] tile
# and walks the samples: M_b = dY_b^T pooled_b for its tile (reduction over L), then
#   grad_w tile += M_b * scales[b]                     (accumulated over b in registers, stored once)
#   mix_cols[b, pid_d, k] = sum_d M_b[d, k] W[d, k]    (a per-D-tile partial, summed by the caller)
# so no per-sample [C_e, D] matrix is ever written. Programs with pid_k == 0 also sum dY over tokens (for the bias
# and the bias term of the mix gradient), saving a separate pass over dY. Everything is a plain store of a value
# computed in a fixed order: deterministic, no atomics.
# All programs walk (b, L) in the same order at about the same pace, so the rows they read are shared in L2.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _weight_mix_grad_kernel(pooled_ptr, grad_out_ptr, scales_ptr, weight_ptr,
                            grad_weight_ptr, mix_cols_ptr, grad_colsum_ptr,
                            B, L, K, D, mix_rows,
                            stride_pb, stride_pl, stride_pk,
                            stride_gb, stride_gl, stride_gd,
                            stride_wd, stride_wk,
                            BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                            WITH_MIX_GRAD: tl.constexpr, DOT_IN_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = ds < D
    k_ok = ks < K
    tile_ok = d_ok[:, None] & k_ok[None, :]

    grad_w = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    # Per-sample base pointers advance by one sample's stride each step (pointer arithmetic stays 64-bit).
    grad_rows = grad_out_ptr + ds[:, None] * stride_gd
    pooled_cols = pooled_ptr + ks[None, :] * stride_pk
    scales_row = scales_ptr + ks
    mix_cols_row = mix_cols_ptr + pid_d * K + ks
    colsum_row = grad_colsum_ptr + ds
    if USE_TMA:  # [B, L, D] output gradient, [B, L, K] pooled, [D, K] weight
        grad_desc = tl.make_tensor_descriptor(grad_out_ptr, [B, L, D], [stride_gb, stride_gl, 1],
                                              [1, BLOCK_L, BLOCK_D])
        pooled_desc = tl.make_tensor_descriptor(pooled_ptr, [B, L, K], [stride_pb, stride_pl, 1],
                                                [1, BLOCK_L, BLOCK_K])
        weight_desc = tl.make_tensor_descriptor(weight_ptr, [D, K], [stride_wd, 1], [BLOCK_D, BLOCK_K])
    for batch in range(B):
        product = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
        colsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            if USE_TMA:
                dy_t = grad_desc.load([batch, l0, pid_d * BLOCK_D]).reshape(BLOCK_L, BLOCK_D).T
                p = pooled_desc.load([batch, l0, pid_k * BLOCK_K]).reshape(BLOCK_L, BLOCK_K)
            else:
                ls = l0 + tl.arange(0, BLOCK_L)
                l_ok = ls < L
                dy_t = tl.load(grad_rows + ls[None, :] * stride_gl, mask=d_ok[:, None] & l_ok[None, :], other=0.0)
                p = tl.load(pooled_cols + ls[:, None] * stride_pl, mask=l_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                product = tl.dot(dy_t.to(tl.float32), p.to(tl.float32), product, input_precision="ieee")
            else:
                product = tl.dot(dy_t, p, product)
            if pid_k == 0:
                colsum += tl.sum(dy_t.to(tl.float32), axis=1)
        s = tl.load(scales_row, mask=k_ok, other=0.0)
        grad_w += product * s[None, :]
        if WITH_MIX_GRAD:
            # The weight tile is re-read per sample (from L2) rather than held: a third fp32 tile of registers
            # would spill at the tile sizes that keep the tensor cores busy.
            if USE_TMA:
                w = weight_desc.load([pid_d * BLOCK_D, pid_k * BLOCK_K])
            else:
                w = tl.load(weight_ptr + ds[:, None] * stride_wd + ks[None, :] * stride_wk, mask=tile_ok, other=0.0)
            tl.store(mix_cols_row, tl.sum(product * w, axis=0), mask=k_ok)
        if pid_k == 0:
            tl.store(colsum_row, colsum, mask=d_ok)
        grad_rows += stride_gb
        pooled_cols += stride_pb
        scales_row += K
        mix_cols_row += mix_rows * K
        colsum_row += D
    tl.store(grad_weight_ptr + ds[:, None] * K + ks[None, :], grad_w, mask=tile_ok)


# (BLOCK_D, BLOCK_K, BLOCK_L, warps, stages). Two fp32 [BLOCK_D, BLOCK_K] tiles (this sample's product and the
# weight gradient) live through the loop, plus the weight tile for the mix. `merv-fast kernels check`: 128x128 tiles
# spill at 4 and 8 warps everywhere; 128x64, 64x128 (8 warps) and 64x64x64 compile spill-free with triton 3.9 but
# spill on sm_80 with triton 3.6 (the GPU machines' version), so the pointer variant offers only the config clean
# on both.
# The TMA variant keeps no per-element addresses or masks in registers (244 -> 168 at 64x64x32 on sm_90): 64x64x64
# and 128x64, 64x128 at 8 warps compile spill-free there with triton 3.6 and 3.9, so on sm_90 the autotuner may pick
# those wider tiles, which read each sample's rows fewer times (the same check: 128x128 still spills).
_WEIGHT_GRAD_CONFIGS = {False: [(64, 64, 32, 4, 4)],
                        True: [(64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]}
_weight_mix_grad_tuned = {
    use_tma: _tuned(_weight_mix_grad_kernel, _configs(shapes, ("BLOCK_D", "BLOCK_K", "BLOCK_L")),
                    key=["L", "K", "D", "WITH_MIX_GRAD", "DOT_IN_FP32", "USE_TMA"],
                    # Benchmarking runs every config on the same buffer: the rows a narrow BLOCK_D wrote must not
                    # survive into the chosen wider one's result.
                    reset_to_zero=["mix_cols_ptr"])
    for use_tma, shapes in _WEIGHT_GRAD_CONFIGS.items()}


def weight_mix_grad(pooled: torch.Tensor, grad_out: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor,
                    with_mix_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_weight [D, K] fp32, mix_cols [B, K] fp32, grad_colsum [B, D] fp32), see the kernel above.
    mix_cols is zero when with_mix_grad is False (one encoder: its weight is the constant 1)."""
    b, length, k = pooled.shape
    d = weight.shape[0]
    scales = scales.contiguous()
    grad_weight = _new_output((d, k), torch.float32, pooled.device)
    grad_colsum = _new_output((b, d), torch.float32, pooled.device)
    flags = dict(WITH_MIX_GRAD=with_mix_grad, DOT_IN_FP32=_dot_in_fp32(pooled.dtype),
                 USE_TMA=uses_tma(pooled, grad_out, weight))
    if interpreter_enabled():
        blocks = dict(BLOCK_D=_INTERPRETER_BLOCKS, BLOCK_K=_INTERPRETER_BLOCKS, BLOCK_L=_INTERPRETER_BLOCKS)
        mix_rows = triton.cdiv(d, blocks["BLOCK_D"])
        # Every row is written here (one config), so poisoning it checks the kernel too.
        mix_cols = _new_output((b, mix_rows, k), torch.float32, pooled.device)
        if not with_mix_grad:
            mix_cols.zero_()
        grid = (triton.cdiv(k, blocks["BLOCK_K"]), mix_rows)
        launch(_weight_mix_grad_kernel, grid, pooled, grad_out, scales, weight, grad_weight, mix_cols, grad_colsum,
                                      b, length, k, d, mix_rows, *pooled.stride(), *grad_out.stride(),
                                      *weight.stride(), **blocks, **flags)
    else:
        # The autotuner picks BLOCK_D after this buffer exists: size it for the smallest BLOCK_D and zero it, so
        # the rows a wider tile leaves unwritten add nothing.
        mix_rows = triton.cdiv(d, min(c[0] for c in _WEIGHT_GRAD_CONFIGS[flags["USE_TMA"]]))
        mix_cols = torch.zeros((b, mix_rows, k), dtype=torch.float32, device=pooled.device)

        def grid(meta):
            return (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(d, meta["BLOCK_D"]))
        launch(_weight_mix_grad_tuned[flags["USE_TMA"]], grid, pooled, grad_out, scales, weight, grad_weight,
               mix_cols, grad_colsum, b, length, k, d, mix_rows, *pooled.stride(), *grad_out.stride(),
               *weight.stride(), **flags)
    return grad_weight, mix_cols.sum(1), grad_colsum


# ---------------------------------------------------------------------------------------------------------------
# Pooled gradient: grad_p[b, l, k] = scales[b, k] * sum_d dY[b, l, d] * weight[d, k]; the scaling in the epilogue.
# Grid: (L tiles * K tiles, B), grouped along L like the forward.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _pooled_grad_kernel(grad_out_ptr, scales_ptr, weight_ptr, grad_pooled_ptr,
                        L, K, D,
                        stride_gb, stride_gl, stride_gd,
                        stride_wd, stride_wk,
                        stride_rb, stride_rl, stride_rk,
                        BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        GROUP_L: tl.constexpr, DOT_IN_FP32: tl.constexpr, USE_TMA: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_l = tl.cdiv(L, BLOCK_L)
    num_k = tl.cdiv(K, BLOCK_K)
    programs_per_group = GROUP_L * num_k
    first_l = (pid // programs_per_group) * GROUP_L
    group_size = tl.minimum(num_l - first_l, GROUP_L)
    pid_l = first_l + (pid % programs_per_group) % group_size
    pid_k = (pid % programs_per_group) // group_size

    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < L
    k_ok = ks < K
    grad_rows = grad_out_ptr + batch * stride_gb + rows[:, None] * stride_gl
    if USE_TMA:  # this sample's [L, D] output gradient, the [D, K] weight and this sample's [L, K] result
        grad_desc = tl.make_tensor_descriptor(grad_out_ptr + batch * stride_gb, [L, D], [stride_gl, 1],
                                              [BLOCK_L, BLOCK_D])
        weight_desc = tl.make_tensor_descriptor(weight_ptr, [D, K], [stride_wd, 1], [BLOCK_D, BLOCK_K])
        result_desc = tl.make_tensor_descriptor(grad_pooled_ptr + batch * stride_rb, [L, K], [stride_rl, 1],
                                                [BLOCK_L, BLOCK_K])

    acc = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if USE_TMA:
            dy = grad_desc.load([pid_l * BLOCK_L, d0])
            w = weight_desc.load([d0, pid_k * BLOCK_K])
        else:
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            dy = tl.load(grad_rows + ds[None, :] * stride_gd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + ds[:, None] * stride_wd + ks[None, :] * stride_wk,
                        mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(dy.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w, acc)

    acc *= tl.load(scales_ptr + batch * K + ks, mask=k_ok, other=0.0)[None, :]
    if USE_TMA:
        result_desc.store([pid_l * BLOCK_L, pid_k * BLOCK_K], acc.to(grad_pooled_ptr.dtype.element_ty))
    else:
        tl.store(grad_pooled_ptr + batch * stride_rb + rows[:, None] * stride_rl + ks[None, :] * stride_rk,
                 acc.to(grad_pooled_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


_pooled_grad_tuned = _tuned(_pooled_grad_kernel, _configs([
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4),
], ("BLOCK_L", "BLOCK_K", "BLOCK_D")), key=["L", "K", "D", "DOT_IN_FP32", "USE_TMA"])


def pooled_grad(grad_out: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_out [B, L, D] (any strides), scales [B, K] fp32, weight [D, K] -> grad_pooled [B, L, K] in grad_out's
    dtype."""
    b, length, d = grad_out.shape
    k = weight.shape[1]
    scales = scales.contiguous()
    grad_pooled = _new_output((b, length, k), grad_out.dtype, grad_out.device)
    args = (grad_out, scales, weight, grad_pooled, length, k, d, *grad_out.stride(), *weight.stride(),
            *grad_pooled.stride())
    flags = dict(GROUP_L=8, DOT_IN_FP32=_dot_in_fp32(grad_out.dtype),
                 USE_TMA=uses_tma(grad_out, weight, grad_pooled))
    if interpreter_enabled():
        blocks = dict(BLOCK_L=_INTERPRETER_BLOCKS, BLOCK_K=_INTERPRETER_BLOCKS, BLOCK_D=_INTERPRETER_BLOCKS)
        grid = (triton.cdiv(length, blocks["BLOCK_L"]) * triton.cdiv(k, blocks["BLOCK_K"]), b)
        launch(_pooled_grad_kernel, grid, *args, **blocks, **flags)
    else:
        def grid(meta):
            return (triton.cdiv(length, meta["BLOCK_L"]) * triton.cdiv(k, meta["BLOCK_K"]), b)
        launch(_pooled_grad_tuned, grid, *args, **flags)
    return grad_pooled


def aot_launches(model) -> None:
    """The launches the model makes (kernels/aot.py records them on meta tensors): the forward on the pooled buffer,
    the weight (+ mix, with several encoders) gradient and the pooled gradient."""
    batch, tokens = model.batch, model.pool_size[0] * model.pool_size[1] * model.pool_size[2]
    k, d = sum(e.channels for e in model.encoders), model.llm_hidden
    pooled, weight = model.empty(batch, tokens, k), model.empty(d, k)
    scales = model.empty(batch, k, dtype=torch.float32)
    out = forward(pooled, scales, weight, model.empty(batch, d, dtype=torch.float32))
    weight_mix_grad(pooled, out, scales, weight, with_mix_grad=len(model.encoders) > 1)
    pooled_grad(out, scales, weight)
