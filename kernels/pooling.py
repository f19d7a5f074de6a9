"""Spatio-temporal pooling of encoder features to one grid (MERV_SPEC.md section 3).

The torch reference is the release's computation: view [B, T, H*W, C] as [B, C, T, H, W], `adaptive_avg_pool3d`,
flatten frame-major to [B, T'*H'*W', C]. PyTorch's adaptive windows are start = floor(i*n/m),
end = ceil((i+1)*n/m): exact 2x2 means for 16 -> 8, overlapping windows of 2 and 3 for 14 -> 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """The pooling op the model calls. Only the torch path exists so far; the Triton kernel plugs in here."""
    return pool_reference(features, grid, size)
