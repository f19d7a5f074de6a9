"""Pooling equals the release's AdaptiveAvgPool3d, on exact (16x16) and overlapping (14x14) grids."""

import pytest
import torch

from merv_fast.kernels.pooling import adaptive_windows, pool, pool_reference, square_grid


def loop_pool(x, grid, size):
    """An independent definition: mean over each adaptive window, token by token."""
    b, t, n, c = x.shape
    h, w = grid
    x = x.reshape(b, t, h, w, c)
    out = []
    for t0, t1 in adaptive_windows(t, size[0]):
        for h0, h1 in adaptive_windows(h, size[1]):
            for w0, w1 in adaptive_windows(w, size[2]):
                out.append(x[:, t0:t1, h0:h1, w0:w1].mean(dim=(1, 2, 3)))
    return torch.stack(out, dim=1)


def test_windows_14_to_8_overlap_with_sizes_2_and_3():
    windows = adaptive_windows(14, 8)
    assert windows[0] == (0, 2) and windows[1] == (1, 4)
    assert {e - s for s, e in windows} == {2, 3}
    assert any(windows[i][1] > windows[i + 1][0] for i in range(7))
    assert adaptive_windows(16, 8) == [(2 * i, 2 * i + 2) for i in range(8)]


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (7, 5), (9, 13)])
@pytest.mark.parametrize("t,size", [(16, (16, 8, 8)), (8, (4, 8, 8)), (5, (3, 4, 4))])
def test_pool_matches_adaptive_avg_pool3d_and_loop(grid, t, size):
    g = torch.Generator().manual_seed(hash((grid, t)) % 2**31)
    c = 19
    x = torch.randn(2, t, grid[0] * grid[1], c, generator=g, dtype=torch.float64)
    ref = torch.nn.AdaptiveAvgPool3d(size)(x.reshape(2, t, *grid, c).permute(0, 4, 1, 2, 3))
    ref = ref.flatten(2).transpose(1, 2)
    got = pool(x, grid, size)
    assert got.shape == (2, size[0] * size[1] * size[2], c)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, loop_pool(x, grid, size), rtol=1e-12, atol=1e-12)


def test_pool_accepts_strided_and_expanded_inputs():
    base = torch.randn(2, 1, 196, 24, dtype=torch.float64)
    tiled = base.expand(-1, 16, -1, -1)  # an image's per-frame features, tiled without copying
    strided = torch.randn(2, 16, 196, 48, dtype=torch.float64)[..., ::2]
    for x in (tiled, strided):
        torch.testing.assert_close(pool(x, (14, 14), (16, 8, 8)), pool_reference(x.contiguous(), (14, 14), (16, 8, 8)))


def test_key_mean_of_pooled_tokens_differs_from_raw_mean_on_overlapping_grids():
    x = torch.randn(1, 16, 196, 8, dtype=torch.float64)
    pooled_mean = pool(x, (14, 14), (16, 8, 8)).mean(1)
    assert not torch.allclose(pooled_mean, x.mean(dim=(1, 2)))
    y = torch.randn(1, 16, 256, 8, dtype=torch.float64)  # exact windows: the means agree
    torch.testing.assert_close(pool(y, (16, 16), (16, 8, 8)).mean(1), y.mean(dim=(1, 2)))


def test_bad_grids_are_named():
    with pytest.raises(ValueError, match="grid"):
        pool(torch.randn(1, 2, 10, 3), (3, 3), (1, 2, 2))
    with pytest.raises(ValueError, match="square"):
        square_grid(10)
