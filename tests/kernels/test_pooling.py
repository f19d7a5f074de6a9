"""Pooling equals the release's AdaptiveAvgPool3d, on exact (16x16) and overlapping (14x14) grids; pool_concat's
custom op (torch path) forward, backward, torch.compile and opcheck."""

import os
import subprocess
import sys

import pytest
import torch

from merv_fast.kernels.dispatch import use_backend
from merv_fast.kernels.pooling import (
    adaptive_windows,
    pool,
    pool_concat,
    pool_concat_reference,
    pool_reference,
    square_grid,
)


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


# ---- all encoders at once: pool_concat (torch path here; the Triton kernels are tested in tests/kernels/triton) ----


ENCODERS = [((14, 14), 24, 16), ((16, 16), 17, 8), ((7, 9), 30, 32)]  # (grid, C, T): odd widths, mixed T
SIZE = (4, 4, 4)


def encoder_features(dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, t, grid[0] * grid[1], c, generator=g, dtype=dtype) for grid, c, t in ENCODERS]
    feats[1] = feats[1][:, :1].expand(-1, 8, -1, -1)  # a tiled image: stride-0 time axis
    if requires_grad:
        feats = [f.detach().clone().requires_grad_() for f in feats]
    return feats, [grid for grid, _, _ in ENCODERS]


def test_pool_concat_reference_is_column_blocks_and_pooled_token_means():
    feats, grids = encoder_features()
    pooled, means = pool_concat_reference(feats, grids, SIZE)
    assert pooled.shape == (2, 64, 24 + 17 + 30) and means.shape == (2, 71)
    offset = 0
    for f, g in zip(feats, grids):
        block = pooled[..., offset:offset + f.shape[-1]]
        torch.testing.assert_close(block, loop_pool(f, g, SIZE), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(means[:, offset:offset + f.shape[-1]], block.mean(1), rtol=1e-12, atol=1e-12)
        offset += f.shape[-1]


def test_pool_concat_checks_its_inputs():
    feats, grids = encoder_features(torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        pool_concat([feats[0], feats[1].half()], grids[:2], SIZE)
    with pytest.raises(ValueError, match="grid"):
        pool_concat(feats, [(14, 14), (16, 16), (9, 7 + 1)], SIZE)
    with pytest.raises(ValueError, match="grids"):
        pool_concat(feats, grids[:2], SIZE)


def test_pool_concat_op_forward_and_backward_on_the_torch_path():
    feats, grids = encoder_features(requires_grad=True)
    reference = [f.detach().clone().requires_grad_() for f in feats]
    with use_backend("torch"):
        pooled, means = pool_concat(feats, grids, SIZE)
    want_pooled, want_means = pool_concat_reference(reference, grids, SIZE)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)
    torch.testing.assert_close(means, want_means, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    grad_pooled, grad_means = torch.randn(pooled.shape, generator=g, dtype=torch.float64), torch.randn(
        means.shape, generator=g, dtype=torch.float64)
    torch.autograd.backward((pooled, means), (grad_pooled, grad_means))
    torch.autograd.backward((want_pooled, want_means), (grad_pooled, grad_means))
    for f, r in zip(feats, reference):
        torch.testing.assert_close(f.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_of_the_reference_and_of_the_op():
    """float64 gradcheck of the reference, and of the custom op (whose backward is a separate formula)."""
    feats = [torch.randn(1, 3, 12, 2, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 4, 9, 3, dtype=torch.float64, requires_grad=True)]
    grids, size = [(3, 4), (3, 3)], (2, 2, 3)  # 3x4 -> 2x3 and 3x3 -> 2x3: overlapping windows
    assert torch.autograd.gradcheck(lambda a, b: pool_concat_reference([a, b], grids, size), feats)
    with use_backend("torch"):
        assert torch.autograd.gradcheck(lambda a, b: pool_concat([a, b], grids, size), feats)


def test_op_backward_when_only_one_output_is_used():
    feats, grids = encoder_features(requires_grad=True)
    with use_backend("torch"):
        pool_concat(feats, grids, SIZE)[1].sum().backward()
    reference = [f.detach().clone().requires_grad_() for f in feats]
    pool_concat_reference(reference, grids, SIZE)[1].sum().backward()
    for f, r in zip(feats, reference):
        torch.testing.assert_close(f.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_pool_concat_compiles_fullgraph_with_its_backward():
    feats, grids = encoder_features(torch.float32, requires_grad=True)
    reference = [f.detach().clone().requires_grad_() for f in feats]

    def loss(*features):
        pooled, means = pool_concat(list(features), grids, SIZE)
        return pooled.square().sum() + (means * 3).sum()

    torch._dynamo.reset()
    with use_backend("torch"):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*feats)
    compiled.backward()
    eager = loss(*reference)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    for f, r in zip(feats, reference):
        torch.testing.assert_close(f.grad, r.grad)


def test_pool_concat_custom_op_passes_opcheck():
    feats, grids = encoder_features(torch.float32, requires_grad=True)
    flat_grids = [d for g in grids for d in g]
    with use_backend("torch"):
        torch.library.opcheck(torch.ops.merv_fast.pool_concat.default, (feats, flat_grids, list(SIZE)))


def test_pool_concat_runs_without_triton_installed():
    """Triton is imported only when its path runs: with `import triton` failing, the CPU path still works."""
    code = ("import sys; sys.modules['triton'] = None; import torch; "
            "from merv_fast.kernels.pooling import pool_concat; "
            "x = torch.randn(1, 2, 4, 3, requires_grad=True); p, m = pool_concat([x], [(2, 2)], (1, 1, 1)); "
            "(p.sum() + m.sum()).backward(); print(x.grad.shape)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MERV_FAST_KERNELS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "torch.Size([1, 2, 4, 3])"
