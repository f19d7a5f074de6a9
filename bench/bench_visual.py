"""pytest-benchmark suite: the visual path (pooling, projection+fusion), ours vs the release's modules, forward and
forward+backward.

"ours" is what the model calls (`pool_concat`, `project_fuse_concat`): fused Triton kernels on a GPU, the torch
reference on a CPU. "release" is the release's computation: AdaptiveAvgPool3d per encoder, E nn.Linear projectors and
nn.MultiheadAttention weights (`ReleaseFusion`). CPU/CI: tiny shapes, run once as tests (`--benchmark-disable`).
GPU: merv-7b shapes in bf16 at B=1, 8, 16; the figure of record is the CUDA-event median in
`extra_info["cuda_median_ms"]`, inputs rotated across iterations.
Every benchmark first checks, once and outside the timed region, that "ours" computes the release's result on the
same inputs (outputs, and gradients for the backward cases; per-dtype tolerance relative to the largest value).
`test_fusion_fwd_bwd` runs every fusion strategy the release can run, ours vs the release's computation.
Measure: `python -m pytest bench/bench_visual.py --benchmark-enable --benchmark-json out.json`.
"""

import pytest
import torch

from merv_fast.config import apply_overrides, get_preset
from merv_fast.kernels import use_backend
from merv_fast.kernels.pooling import pool_concat, pool_concat_reference
from merv_fast.kernels.project_fuse import ReleaseFusion, project_fuse_concat
from merv_fast.measure.timing import measure
from merv_fast.model.release_visual import release_visual
from merv_fast.model.visual import VisualPath

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [("merv-7b", b, torch.bfloat16) for b in (1, 8, 16)] if CUDA else [("tiny", 2, torch.float32)]


def make_inputs(preset: str, batch: int, dtype, copies: int = 3):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, dtype)
    feats = [[torch.randn(batch, e.time_steps, e.tokens_per_step, e.hidden_size, device=DEVICE, dtype=dtype)
              for e in cfg.encoders] for _ in range(copies)]
    return cfg, visual, feats


# max |ours - release| / max |release|: fp32 sums in another order; bf16 rounds the products' inputs and outputs
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def assert_matches(ours, release, dtype, what: str):
    ours, release = [t.detach().float() for t in ours], [t.detach().float() for t in release]
    assert len(ours) == len(release), what
    for i, (a, b) in enumerate(zip(ours, release)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        error = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        assert error <= TOLERANCE[dtype], f"{what}[{i}]: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def record(benchmark, fn, rotate):
    """Run under pytest-benchmark, and on GPU also store the CUDA-event timing that is the figure of record."""
    calls = iter(range(10**9))
    benchmark(lambda: fn(*rotate[next(calls) % len(rotate)]))
    if CUDA:
        t = measure(fn, rotate=rotate, warmup=3, iters=20)
        benchmark.extra_info.update(cuda_median_ms=t.median_ms, cuda_p20_ms=t.p20_ms, cuda_p80_ms=t.p80_ms)


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("impl", ["ours", "release"])
def test_pool(benchmark, preset, batch, dtype, impl):
    cfg, _, feats = make_inputs(preset, batch, dtype)
    op = pool_concat if impl == "ours" else pool_concat_reference
    grids = [e.grid for e in cfg.encoders]
    assert_matches(op(list(feats[0]), grids, cfg.visual.pool_size),
                   pool_concat_reference(list(feats[0]), grids, cfg.visual.pool_size), dtype, "pool (pooled, means)")
    record(benchmark, lambda *f: op(list(f), grids, cfg.visual.pool_size), [tuple(f) for f in feats])


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("impl", ["ours", "release"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_project_fuse(benchmark, preset, batch, dtype, impl, backward):
    cfg, visual, feats = make_inputs(preset, batch, dtype)
    pooled = [visual.pool(list(f)) for f in feats]
    weights, biases = [p.weight for p in visual.projectors], [p.bias for p in visual.projectors]
    fusion = visual.fusion.weights()
    offsets = visual.offsets
    release = ReleaseFusion(weights, biases, fusion, visual.fusion.attention.state_dict())

    def run(p, m, which=impl):
        if which == "ours":
            out = project_fuse_concat(p, m, offsets, torch.cat(weights, 1), torch.stack(biases), fusion)[0]
        else:
            out = release([p[..., lo:hi] for lo, hi in zip(offsets, offsets[1:])])
        if backward:
            out.float().sum().backward()
        return out

    # ReleaseFusion holds copies of the projectors: each side's weight and bias gradients land on its own tensors
    params = {"ours": weights + biases,
              "release": [p.weight for p in release.projectors] + [p.bias for p in release.projectors]}

    def result(which):
        for t in params[which]:
            t.grad = None
        out = run(*pooled[0], which=which)
        return [out] + ([t.grad.clone() for t in params[which]] if backward else [])

    assert_matches(result(impl), result("release"), dtype, f"project_fuse {impl} (output, weight and bias grads)")
    for t in params["ours"] + params["release"]:
        t.grad = None
    record(benchmark, run, pooled)


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
def test_visual_path_fwd_bwd(benchmark, preset, batch, dtype):
    """The model's whole visual path as it trains: pooling, projection, fusion, backward to the parameters."""
    _, visual, feats = make_inputs(preset, batch, dtype)

    def result():
        visual.zero_grad(set_to_none=True)
        out = visual(list(feats[0]))
        out.float().sum().backward()
        return [out] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in visual.parameters()]

    with use_backend("torch"):  # the torch references: the release's computation
        expected = result()
    assert_matches(result(), expected, dtype, "visual path (output, parameter gradients)")
    visual.zero_grad(set_to_none=True)
    record(benchmark, lambda *f: visual(list(f)).float().sum().backward(), [tuple(f) for f in feats])


FUSIONS = ["cross_attention_avg_lq", "concat_channel", "concat_channel_ln", "concat", "first"]


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("impl", ["ours", "release"])
def test_fusion_fwd_bwd(benchmark, preset, batch, dtype, fusion, impl):
    """Each fusion strategy's whole visual path (pooling, projection, fusion) forward and backward to the parameters:
    "ours" is the model's VisualPath (the fused op where the fusion folds into it), "release" the release's
    computation written out (merv_fast/model/release_visual.py: every P_e materialised)."""
    cfg = apply_overrides(get_preset(preset), {"visual.fusion": fusion})
    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, dtype)
    feats = [[torch.randn(batch, e.time_steps, e.tokens_per_step, e.hidden_size, device=DEVICE, dtype=dtype)
              for e in cfg.encoders] for _ in range(3)]

    def run(*f, which=impl):
        out = visual(list(f)) if which == "ours" else release_visual(visual, cfg, list(f))[0]
        out.float().sum().backward()
        return out

    def result(which):  # both compute with the module's own parameters: their gradients are comparable
        visual.zero_grad(set_to_none=True)
        out = run(*feats[0], which=which)
        # a parameter one side never touches ("first": the other encoders' projectors) has gradient zero there
        return [out] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in visual.parameters()]

    assert_matches(result(impl), result("release"), dtype, f"{fusion} visual path (output, parameter gradients)")
    visual.zero_grad(set_to_none=True)
    record(benchmark, run, [tuple(f) for f in feats])
