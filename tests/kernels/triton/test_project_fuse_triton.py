"""The fused projection + fusion kernels (kernels/project_fuse_triton.py through `project_fuse_concat`) against the
release's computation (`project_fuse_reference`) in float64: outputs, mix weights, and the gradient of every
trainable parameter and of the pooled tokens.

Inputs are fresh random numbers each run (the seed is in every failure message), with odd shapes that cross tile
edges, pooled as a column slice of a wider buffer (non-contiguous), and every kernel output prefilled with NaN so an
element a kernel leaves unwritten fails. The reference gets the very values the op got (inputs rounded to the test
dtype, then widened to float64), so the errors measured are the op's own.

The kernels' TMA variant (sm_90) runs here too, pinned with `use_target(90)`: in the interpreter its products give the
pointer variant's bits (same tiles, same products in the same order), and the whole op through it matches the
reference.
"""

import random
import time

import pytest
import torch

from merv_fast.kernels import project_fuse_triton, use_backend
from merv_fast.kernels.dispatch import use_target
from merv_fast.kernels.project_fuse import FusionWeights, _TorchEngine, project_fuse_concat, project_fuse_reference

from .conftest import DEVICE, INTERPRETER

PARAM_NAMES = ("weight", "bias", "query", "q_weight", "q_bias", "k_weight", "k_bias")
# Relative error by norm vs float64. bf16: the interpreter's arithmetic is fp32 (load/store path only); on a GPU
# the dots run in bf16, so its bound there is the bf16 one.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# The query and its projections get gradient only through the softmax: d mix_e - d mix_j, differences of sums over
# L*C*D terms of random sign, whose relative error is ~eps*sqrt(terms) in any fp32 arithmetic. Measured over 12 seeds
# at (120, 100) x L=100 x D=130: the fused op's worst 1.0e-5, the release's computation run in fp32 5.7e-5.
SOFTMAX_ONLY_PARAMS = ("query", "q_weight", "q_bias", "k_weight")
SOFTMAX_ONLY_FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def imports_done_once():
    """A custom op's first call imports torch._dynamo (~1 s, once per process): paid here, not by the first test."""
    import torch._dynamo  # noqa: F401


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(project_fuse_triton, "POISON_OUTPUTS", True)


@pytest.fixture
def seed():
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value


def make_case(sizes, length, width, embed, dtype, fused=True):
    """float64 values already rounded to dtype: pooled [3, L, K] sliced from a wider buffer, its token mean, the
    stacked projector weights and biases, the fusion parameters (None with fused=False), and an output gradient."""
    k, e, b = sum(sizes), len(sizes), 3
    offsets = [0]
    for c in sizes:
        offsets.append(offsets[-1] + c)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).double()

    case = dict(offsets=offsets, dtype=dtype, pooled=rand(b, length, k), weight=rand(width, k, scale=k**-0.5),
                bias=rand(e, width), grad_out=rand(b, length, width))
    if fused:  # query scaled up so that the mix weights are far from uniform
        case.update(query=rand(1, embed, scale=1.5), q_weight=rand(embed, embed, scale=embed**-0.5),
                    q_bias=rand(embed), k_weight=rand(embed, width, scale=width**-0.5), k_bias=rand(embed))
    return case


def leaves(case, names, dtype, device):
    return {n: case[n].to(device=device, dtype=dtype).requires_grad_() for n in names if n in case}


def run_fused(case, pooled_grad: bool, grad_layout_transposed=False, aligned=False):
    """Runs the Triton path: (out, mix, grads by name) in float64; pooled is a column slice of a wider buffer, at
    2 columns in (no TMA descriptor can address it) or, aligned, at 8 columns in a row of K + 16 (one can, for a K
    that is a multiple of 8)."""
    dtype = case["dtype"]
    b, length, k = case["pooled"].shape
    first, extra = (8, 16) if aligned else (2, 5)
    wide = torch.full((b, length, k + extra), float("nan"), dtype=dtype, device=DEVICE)
    wide[..., first:first + k] = case["pooled"].to(dtype)
    pooled = wide[..., first:first + k]
    assert not pooled.is_contiguous()
    pooled.requires_grad_(pooled_grad)
    params = leaves(case, PARAM_NAMES, dtype, DEVICE)
    fusion = FusionWeights(*(params[n] for n in PARAM_NAMES[2:])) if "query" in params else None
    with use_backend("triton"):
        out, mix = project_fuse_concat(pooled, pooled.mean(1), case["offsets"], params["weight"], params["bias"],
                                       fusion)
        grad_out = case["grad_out"].to(device=DEVICE, dtype=dtype)
        if grad_layout_transposed:  # the same values with another memory layout: the kernels take any strides
            grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
        inputs = list(params.values()) + ([pooled] if pooled_grad else [])
        grads = torch.autograd.grad(out, inputs, grad_outputs=grad_out)
    names = list(params) + (["pooled"] if pooled_grad else [])
    return out.double().cpu(), mix.double().cpu(), {n: g.double().cpu() for n, g in zip(names, grads)}


def run_reference(case, pooled_grad: bool):
    """The release's computation in float64 on the same values; means come from P_e inside it."""
    pooled = case["pooled"].clone().requires_grad_(pooled_grad)
    params = leaves(case, PARAM_NAMES, torch.float64, "cpu")
    fusion = FusionWeights(*(params[n] for n in PARAM_NAMES[2:])) if "query" in params else None
    blocks = list(zip(case["offsets"][:-1], case["offsets"][1:]))
    out, mix = project_fuse_reference([pooled[..., lo:hi] for lo, hi in blocks],
                                      [params["weight"][:, lo:hi] for lo, hi in blocks],
                                      list(params["bias"].unbind(0)), fusion)
    inputs = list(params.values()) + ([pooled] if pooled_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_outputs=case["grad_out"])
    names = list(params) + (["pooled"] if pooled_grad else [])
    return out.detach(), mix.detach(), dict(zip(names, grads))


def relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


def check_against_reference(case, seed, pooled_grad, **run_kwargs):
    start = time.perf_counter()
    out, mix, grads = run_fused(case, pooled_grad, **run_kwargs)
    seconds = time.perf_counter() - start
    ref_out, ref_mix, ref_grads = run_reference(case, pooled_grad)
    tol = TOLERANCE[case["dtype"]]
    where = f"seed {seed}, {case['dtype']}, offsets {case['offsets']}, L={out.shape[1]}, D={out.shape[2]}"
    assert torch.isfinite(out).all() and torch.isfinite(mix).all(), f"unwritten (NaN) output elements; {where}"
    assert relative_error(out, ref_out) < tol, f"output: {relative_error(out, ref_out):.2e}; {where}"
    assert relative_error(mix, ref_mix) < tol, f"mix: {relative_error(mix, ref_mix):.2e}; {where}"
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), f"d {name} has NaN (unwritten elements?); {where}"
        if name == "k_bias":
            # Exactly zero in exact arithmetic (q . bk is the same for every encoder and cancels in the softmax):
            # an absolute bound, scaled by the size of its neighbour k_weight's gradient.
            bound = 10 * TOLERANCE[case["dtype"]] * ref_grads["k_weight"].abs().max().item()
            assert ref.abs().max() < 1e-10 and grads[name].abs().max() < bound, f"d k_bias; {where}"
        else:
            if name in SOFTMAX_ONLY_PARAMS:
                tol = max(TOLERANCE[case["dtype"]], SOFTMAX_ONLY_FP32_TOLERANCE)
            else:
                tol = TOLERANCE[case["dtype"]]
            err = relative_error(grads[name], ref)
            assert err < tol, f"d {name}: relative error {err:.2e} >= {tol:.0e}; {where}"
    return seconds


@pytest.mark.parametrize("sizes, length, width, pooled_grad", [
    ((17, 40, 33, 61, 29, 50), 37, 96, True),  # six encoders, L below one tile
    ((120, 100), 100, 130, False),  # pooled frozen (the encoders are): no pooled-gradient kernel
])
def test_float32_matches_float64_reference(sizes, length, width, pooled_grad, seed):
    check_against_reference(make_case(sizes, length, width, 12, torch.float32), seed, pooled_grad)


def test_single_encoder_float32(seed):
    """One encoder, no fusion weights: the output is the projection, mix is 1."""
    case = make_case((250,), 64, 48, 8, torch.float32, fused=False)
    check_against_reference(case, seed, pooled_grad=True)


def test_float16_matches_float64_reference(seed):
    case = make_case((17, 64, 100, 48), 100, 96, 16, torch.float16)
    check_against_reference(case, seed, pooled_grad=True)


def test_bfloat16_load_store_path(seed):
    case = make_case((30, 70, 25), 64, 96, 8, torch.bfloat16)
    check_against_reference(case, seed, pooled_grad=True, grad_layout_transposed=True)


def test_output_gradient_in_another_layout(seed):
    case = make_case((40, 23), 37, 130, 8, torch.float32)
    check_against_reference(case, seed, pooled_grad=True, grad_layout_transposed=True)


@pytest.mark.parametrize("pooled_grad", [False, True])
def test_saved_for_backward_is_little_more_than_pooled(pooled_grad, seed):
    """Only pooled, its means and the parameters are kept for the backward: no P_e, no scaled copy."""
    case = make_case((50, 80, 33), 64, 96, 8, torch.float32)
    pooled = case["pooled"].float().to(DEVICE).requires_grad_(pooled_grad)
    params = leaves(case, PARAM_NAMES, torch.float32, DEVICE)
    param_ids = {p.data_ptr() for p in params.values()}
    saved = []

    def pack(t):
        if t.data_ptr() not in param_ids:
            saved.append(t.numel() * t.element_size())
        return t

    with use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = project_fuse_concat(pooled, pooled.mean(1), case["offsets"], params["weight"], params["bias"],
                                     FusionWeights(*(params[n] for n in PARAM_NAMES[2:])))
    pooled_bytes = pooled.numel() * pooled.element_size()
    assert sum(saved) <= 1.25 * pooled_bytes, f"saved {saved} bytes vs pooled {pooled_bytes}; seed {seed}"
    out.sum().backward()  # the graph still runs from what was saved
    assert torch.isfinite(params["weight"].grad).all()


def test_mix_output_gradient_reaches_the_fusion_parameters(seed):
    """A loss on the mix weights themselves (not only the output) flows through the op's mix output."""
    case = make_case((20, 30), 37, 48, 8, torch.float32)
    results = []
    for dtype, backend, device in ((torch.float32, "triton", DEVICE), (torch.float64, "torch", "cpu")):
        params = leaves(case, PARAM_NAMES, dtype, device)
        pooled = case["pooled"].to(device=device, dtype=dtype)
        with use_backend(backend):
            out, mix = project_fuse_concat(pooled, pooled.mean(1), case["offsets"], params["weight"],
                                           params["bias"], FusionWeights(*(params[n] for n in PARAM_NAMES[2:])))
        (mix[:, 0] ** 2).sum().backward()
        results.append(params["query"].grad.double().cpu())
    assert relative_error(*results) < SOFTMAX_ONLY_FP32_TOLERANCE, f"seed {seed}"


# ---------------------------------------------------------------------------------------------------------------
# The TMA variant (sm_90): tensor-descriptor loads and stores in place of per-element pointers.
# ---------------------------------------------------------------------------------------------------------------

# In the interpreter, or on a GPU that has TMA.
tma_here = pytest.mark.skipif(DEVICE == "cuda" and not INTERPRETER and torch.cuda.get_device_capability() < (9, 0),
                              reason="the TMA variant needs sm_90 or newer")


def launch_all(pooled, scales, weight, bias_mix, grad_out, target):
    """The three launchers as built for sm_<target>: forward, weight + mix gradient, pooled gradient."""
    with use_target(target):
        out = project_fuse_triton.forward(pooled, scales, weight, bias_mix)
        grad_weight, mix_cols, colsum = project_fuse_triton.weight_mix_grad(pooled, grad_out, scales, weight, True)
        grad_pooled = project_fuse_triton.pooled_grad(grad_out, scales, weight)
    return {"out": out, "grad_weight": grad_weight, "mix_cols": mix_cols, "grad_colsum": colsum,
            "grad_pooled": grad_pooled}


@tma_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tma_variant_gives_the_pointer_variants_result(dtype, seed):
    """Every output of the three kernels, TMA variant vs pointer variant on the same inputs, and vs the plain torch
    computation of the same algebra in float64. In the interpreter the products give the same bits; the sums of dY
    over tokens agree to fp32 rounding only: the order within a tile's `tl.sum` follows the tile's layout, which
    the TMA variant transposes. On a GPU each variant autotunes on its own, so there they agree to the dtype's
    tolerance. Shapes cross tile edges in every dimension (one config, 64-wide tiles) and keep every row 16-byte
    aligned, so the descriptors are legal."""
    b, length, k, d = 3, 100, 136, 104
    pooled = torch.randn(b, length, k, device=DEVICE).to(dtype)
    weight = (torch.randn(d, k, device=DEVICE) * k**-0.5).to(dtype)
    grad_out = torch.randn(b, length, d, device=DEVICE).to(dtype)
    scales = torch.rand(b, k, device=DEVICE)
    bias_mix = torch.randn(b, d, device=DEVICE)
    with use_target(90):
        assert project_fuse_triton.uses_tma(pooled, weight, grad_out)
    tma = launch_all(pooled, scales, weight, bias_mix, grad_out, 90)
    pointer = launch_all(pooled, scales, weight, bias_mix, grad_out, 80)

    wide = [t.double().cpu() for t in (pooled, scales, weight, bias_mix, grad_out)]
    out = _TorchEngine.forward(wide[0], wide[1], wide[2], wide[3])
    grad_weight, mix_cols, colsum = _TorchEngine.weight_mix_grad(wide[0], wide[4], wide[1], wide[2], True)
    reference = {"out": out, "grad_weight": grad_weight, "mix_cols": mix_cols, "grad_colsum": colsum,
                 "grad_pooled": _TorchEngine.pooled_grad(wide[4], wide[1], wide[2])}
    for name, ref in reference.items():
        got = tma[name].double().cpu()
        where = f"{name}, {dtype}, seed {seed}"
        assert torch.isfinite(got).all(), f"unwritten (NaN) elements in the TMA variant's {where}"
        if INTERPRETER and name != "grad_colsum":
            assert torch.equal(tma[name], pointer[name]), f"TMA and pointer variants differ: {where}"
        elif INTERPRETER:
            assert relative_error(got, pointer[name].double().cpu()) < 1e-6, where
        else:
            assert relative_error(got, pointer[name].double().cpu()) < TOLERANCE[dtype], where
        assert relative_error(got, ref) < TOLERANCE[dtype], f"{relative_error(got, ref):.2e}: {where}"


@tma_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_variant_through_the_op(dtype, seed):
    """The whole op and its backward with every kernel in its TMA variant: pooled a 16-byte aligned column slice
    of a wider buffer, odd channel counts per encoder (their sum a multiple of 8), the output gradient contiguous."""
    case = make_case((17, 40, 33, 62), 37, 96, 8, dtype)
    with use_target(90):
        pooled = torch.zeros(3, 37, 152 + 16, dtype=dtype, device=DEVICE)[..., 8:8 + 152]
        weight = torch.zeros(96, 152, dtype=dtype, device=DEVICE)
        assert project_fuse_triton.uses_tma(pooled, weight, torch.zeros(3, 37, 96, dtype=dtype, device=DEVICE))
        check_against_reference(case, seed, pooled_grad=True, aligned=True)
