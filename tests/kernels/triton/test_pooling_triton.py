"""The fused pooling kernels (kernels/pooling.py) against the torch reference in float64.

Fresh random values every run: each test draws its own seed and names it in every failure message, so a failure can
be replayed with MERV_TEST_SEED=<seed>. Output buffers are filled with NaN before the kernels run, so an element the
kernels never write fails the comparison. Shapes are odd on purpose (C from 17 to 250, non-square 7x9 grids, T' not
dividing T) and small enough for the interpreter (each test well under 2 s there).
"""

import os

import pytest
import torch

from merv_fast.kernels.dispatch import use_backend
from merv_fast.kernels.pooling import (
    pool,
    pool_concat,
    pool_concat_backward_triton,
    pool_concat_reference,
    pool_concat_triton,
    pool_reference,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture
def seeded():
    """A torch.Generator with a fresh seed (or MERV_TEST_SEED), and the seed for failure messages."""
    seed = int(os.environ.get("MERV_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    return torch.Generator().manual_seed(seed), seed


def layout(base_shape, kind, gen, dtype, device):
    """Features [B, T, N, C] with the given memory layout, values drawn from gen."""
    b, t, n, c = base_shape
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    if kind == "contiguous":
        return draw(b, t, n, c)
    if kind == "channel_slice":  # an encoder's channels inside a wider activation
        return draw(b, t, n, c + 9)[..., 5:5 + c]
    if kind == "channel_stride":  # channels not contiguous: stored [B, T, C, N]
        return draw(b, t, c, n).transpose(2, 3)
    if kind == "time_major":  # stored [B, N, T, C], viewed [B, T, N, C]
        return draw(b, n, t, c).transpose(1, 2)
    if kind == "tiled_image":  # one frame's features tiled over time with stride 0
        return draw(b, 1, n, c).expand(b, t, n, c)
    raise ValueError(kind)


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def autograd_of_reference(grad_pooled, grad_means, shapes, grids, size):
    """Feature gradients by autograd through `pool_concat_reference`, in float64 (pooling is linear: zeros will do)."""
    inputs = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    pooled, means = pool_concat_reference(inputs, grids, size)
    return torch.autograd.grad((pooled, means), inputs, (grad_pooled, grad_means))


def run_forward_poisoned(features, grids, size):
    """The Triton launcher writing into NaN-filled buffers: anything left unwritten stays NaN."""
    batch = features[0].shape[0]
    k = sum(f.shape[-1] for f in features)
    tokens = size[0] * size[1] * size[2]
    pooled_out = torch.full((batch, tokens, k), float("nan"), dtype=features[0].dtype, device=features[0].device)
    token_sums = torch.full((batch, size[0], k), float("nan"), dtype=torch.float32, device=features[0].device)
    return pool_concat_triton(features, grids, size, pooled_out=pooled_out, token_sums_out=token_sums)


# (per-encoder (T, grid, C, memory layout), output size): E from 1 to 6, grids 16x16, 14x14, 7x9, T = 8/16/32.
CASES = {
    "one_encoder_14x14_T8to8": ([(8, (14, 14), 250, "contiguous")], (8, 8, 8)),
    "three_encoders_T32to16": ([(32, (16, 16), 40, "channel_slice"), (32, (7, 9), 17, "time_major"),
                                (32, (14, 14), 33, "tiled_image")], (16, 4, 4)),
    "six_encoders_T8to3": ([(8, (16, 16), 24, "contiguous"), (8, (14, 14), 17, "channel_stride"),
                            (8, (7, 9), 31, "channel_slice"), (8, (14, 14), 20, "tiled_image"),
                            (8, (16, 16), 19, "time_major"), (8, (7, 9), 18, "contiguous")], (3, 4, 4)),
    "two_encoders_T16to4_nonsquare_out": ([(16, (7, 9), 117, "channel_stride"), (16, (16, 16), 61, "contiguous")],
                                          (4, 5, 3)),
    "one_encoder_7x9_T32to16": ([(32, (7, 9), 37, "channel_slice")], (16, 8, 8)),
    "two_small_encoders_T8to4": ([(8, (7, 9), 21, "channel_stride"), (8, (16, 16), 18, "tiled_image")], (4, 4, 4)),
}


def make_case(name, gen, dtype, device, batch=3):
    encoders, size = CASES[name]
    features = [layout((batch, t, grid[0] * grid[1], c), kind, gen, dtype, device) for t, grid, c, kind in encoders]
    return features, [grid for _, grid, _, _ in encoders], size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_reference(case, dtype, device, seeded):
    gen, seed = seeded
    features, grids, size = make_case(case, gen, dtype, device)
    pooled, means = run_forward_poisoned(features, grids, size)
    want_pooled, want_means = pool_concat_reference([f.cpu().double() for f in features], grids, size)
    assert pooled.dtype == dtype and means.dtype == dtype, f"seed {seed}"
    assert pooled.shape == want_pooled.shape and means.shape == want_means.shape, f"seed {seed}"
    assert torch.isfinite(pooled).all() and torch.isfinite(means).all(), f"seed {seed}: an output was not written"
    assert relative_error(pooled.cpu(), want_pooled) < TOLERANCE[dtype], f"seed {seed}"
    assert relative_error(means.cpu(), want_means) < TOLERANCE[dtype], f"seed {seed}"
    # Encoder by encoder, each column block is that encoder's own pooling (the block layout, not just the norm).
    offset = 0
    for f, g in zip(features, grids):
        block = pooled[..., offset:offset + f.shape[-1]].cpu()
        assert relative_error(block, pool_reference(f.cpu().double(), g, size)) < TOLERANCE[dtype], f"seed {seed}"
        offset += f.shape[-1]


def test_bfloat16_load_and_store_paths(device, seeded):
    """The interpreter has no bf16 arithmetic, so only bf16 loads, the fp32 widening and bf16 stores are checked
    here; the bf16 tensor-core product runs (and is checked by this same test) on a GPU."""
    gen, seed = seeded
    features, grids, size = make_case("six_encoders_T8to3", gen, torch.bfloat16, device)
    pooled, means = run_forward_poisoned(features, grids, size)
    want_pooled, want_means = pool_concat_reference([f.cpu().double() for f in features], grids, size)
    assert pooled.dtype == torch.bfloat16 and means.dtype == torch.bfloat16
    assert torch.isfinite(pooled).all() and torch.isfinite(means).all(), f"seed {seed}: an output was not written"
    assert relative_error(pooled.cpu(), want_pooled) < 1e-2, f"seed {seed}"
    assert relative_error(means.cpu(), want_means) < 1e-2, f"seed {seed}"


def test_means_are_of_pooled_tokens_not_raw_tokens(device, seeded):
    gen, seed = seeded
    x = torch.randn(2, 8, 196, 24, generator=gen).to(device)
    _, means = run_forward_poisoned([x], [(14, 14)], (4, 8, 8))
    want = pool_reference(x.cpu().double(), (14, 14), (4, 8, 8)).mean(1)
    assert relative_error(means.cpu(), want) < 1e-5, f"seed {seed}"
    assert relative_error(x.cpu().double().mean(dim=(1, 2)), want) > 1e-3, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["six_encoders_T8to3", "two_encoders_T16to4_nonsquare_out", "one_encoder_7x9_T32to16"])
def test_backward_matches_autograd_of_float64_reference(case, dtype, device, seeded):
    gen, seed = seeded
    features, grids, size = make_case(case, gen, dtype, device)
    shapes = [tuple(f.shape) for f in features]
    batch, k = features[0].shape[0], sum(f.shape[-1] for f in features)
    grad_pooled = torch.randn(batch, size[0] * size[1] * size[2], k, generator=gen, dtype=torch.float64)
    grad_means = torch.randn(batch, k, generator=gen, dtype=torch.float64) * 50  # large enough to matter
    want = autograd_of_reference(grad_pooled, grad_means, shapes, grids, size)
    poisoned = [torch.full(s, float("nan"), dtype=dtype, device=device) for s in shapes]
    got = pool_concat_backward_triton(grad_pooled.to(dtype).to(device), grad_means.to(dtype).to(device), shapes,
                                      grids, size, grads_out=poisoned)
    for e, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == dtype, f"seed {seed}, encoder {e}"
        assert torch.isfinite(g).all(), f"seed {seed}, encoder {e}: a gradient element was not written"
        assert relative_error(g.cpu(), w) < TOLERANCE[dtype], f"seed {seed}, encoder {e}"


def test_backward_reads_strided_gradients(device, seeded):
    """grad_pooled and grad_means as autograd may hand them over: non-contiguous (here transposed/expanded)."""
    gen, seed = seeded
    shapes, grids, size = [(3, 16, 63, 21), (3, 16, 196, 40)], [(7, 9), (14, 14)], (8, 4, 4)
    grad_pooled = torch.randn(3, 61, 128, generator=gen, dtype=torch.float64).transpose(1, 2)  # [3, 128, 61]
    grad_means = torch.randn(1, 61, generator=gen, dtype=torch.float64).expand(3, 61)
    want = autograd_of_reference(grad_pooled, grad_means, shapes, grids, size)
    got = pool_concat_backward_triton(grad_pooled.float().to(device), grad_means.float().to(device), shapes, grids,
                                      size)
    for g, w in zip(got, want):
        assert relative_error(g.cpu(), w) < 1e-5, f"seed {seed}"


def test_public_op_runs_the_kernels_forward_and_backward(device, seeded):
    """pool_concat through the custom op: the Triton path on these tensors, gradients through its autograd."""
    gen, seed = seeded
    features, grids, size = make_case("two_small_encoders_T8to4", gen, torch.float32, device)
    leaves = [f.detach().clone().requires_grad_() for f in features]
    with use_backend("triton"):
        pooled, means = pool_concat(leaves, grids, size)
        (pooled.square().sum() + means.sum() * 7).backward()
        single = pool(features[1], grids[1], size)
    reference = [f.detach().cpu().double().requires_grad_() for f in features]
    want_pooled, want_means = pool_concat_reference(reference, grids, size)
    (want_pooled.square().sum() + want_means.sum() * 7).backward()
    assert relative_error(pooled.detach().cpu(), want_pooled) < 1e-5, f"seed {seed}"
    assert relative_error(means.detach().cpu(), want_means) < 1e-5, f"seed {seed}"
    assert relative_error(single.cpu(), pool_reference(reference[1].detach(), grids[1], size)) < 1e-5, f"seed {seed}"
    for leaf, ref in zip(leaves, reference):
        assert relative_error(leaf.grad.cpu(), ref.grad) < 1e-5, f"seed {seed}"


def test_forward_and_backward_are_deterministic(device, seeded):
    """No atomics: two runs agree bit for bit, means included."""
    gen, seed = seeded
    features, grids, size = make_case("two_small_encoders_T8to4", gen, torch.float32, device)
    first, second = run_forward_poisoned(features, grids, size), run_forward_poisoned(features, grids, size)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), f"seed {seed}"
    shapes = [tuple(f.shape) for f in features]
    grads = [pool_concat_backward_triton(first[0], first[1], shapes, grids, size) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads)), f"seed {seed}"
