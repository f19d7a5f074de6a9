"""What the hardware can do at best, measured in the same run as the results that are compared with it.

GPU: a bf16 matmul of 8192^3 (TFLOP/s) and a large device-to-device copy (TB/s, bytes read plus written).
CPU: an fp32 matmul (GFLOP/s) and a memcpy (GB/s), sized for a small machine; only ratios mean anything there.
"""

from __future__ import annotations

import torch

from merv_fast.measure.timing import measure

GPU_MATMUL_N = 8192
GPU_COPY_BYTES = 2 << 30  # far beyond any L2, so the copy streams from HBM
CPU_MATMUL_N = 1024
CPU_COPY_BYTES = 256 << 20


def _matmul_flop_s(n: int, dtype: torch.dtype, device: torch.device, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure(lambda: torch.mm(a, b), warmup=3, iters=iters, device=device)
    # The median, like the results it is compared with; the best-case min would flatter the hardware slightly.
    return 2 * n**3 / (timing.median_ms / 1e3)


def _copy_bytes_s(nbytes: int, device: torch.device, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), warmup=2, iters=iters, device=device)
    return 2 * nbytes / (timing.median_ms / 1e3)  # every byte is read once and written once


def measure_ceilings(device: str | torch.device) -> dict[str, float]:
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "bf16_matmul_tflops": round(_matmul_flop_s(GPU_MATMUL_N, torch.bfloat16, device, 20) / 1e12, 1),
            "copy_tb_s": round(_copy_bytes_s(GPU_COPY_BYTES, device, 20) / 1e12, 3),
        }
    return {
        "fp32_matmul_gflops": round(_matmul_flop_s(CPU_MATMUL_N, torch.float32, device, 5) / 1e9, 1),
        "copy_gb_s": round(_copy_bytes_s(CPU_COPY_BYTES, device, 5) / 1e9, 2),
    }


def flop_s_ceiling(ceilings: dict[str, float]) -> float | None:
    """The compute ceiling in FLOP/s, whichever device measured it."""
    if "bf16_matmul_tflops" in ceilings:
        return ceilings["bf16_matmul_tflops"] * 1e12
    if "fp32_matmul_gflops" in ceilings:
        return ceilings["fp32_matmul_gflops"] * 1e9
    return None


def bytes_s_ceiling(ceilings: dict[str, float]) -> float | None:
    """The memory ceiling in bytes/s, whichever device measured it."""
    if "copy_tb_s" in ceilings:
        return ceilings["copy_tb_s"] * 1e12
    if "copy_gb_s" in ceilings:
        return ceilings["copy_gb_s"] * 1e9
    return None
