"""pytest-benchmark suite: the visual path (pooling, projection+fusion), forward and forward+backward.

CPU/CI: tiny shapes, run once as tests (`--benchmark-disable`). GPU: merv-7b shapes in bf16; the figure of record
is the CUDA-event median stored in `extra_info["cuda_median_ms"]`, inputs rotated across iterations.
Run for real: `python -m pytest bench/bench_visual.py --benchmark-enable --benchmark-json out.json`.
"""

import pytest
import torch

from merv_fast.config import get_preset
from merv_fast.kernels.pooling import pool, pool_reference
from merv_fast.kernels.project_fuse import project_fuse, project_fuse_reference
from merv_fast.measure.timing import measure
from merv_fast.model.visual import VisualPath

CUDA = torch.cuda.is_available()
SIZES = [("tiny", 2, torch.float32)] + ([("merv-7b", 8, torch.bfloat16)] if CUDA else [])
DEVICE = "cuda" if CUDA else "cpu"


def make_inputs(preset: str, batch: int, dtype, copies: int = 3):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, dtype)
    feats = [[torch.randn(batch, e.time_steps, e.tokens_per_step, e.hidden_size, device=DEVICE, dtype=dtype)
              for e in cfg.encoders] for _ in range(copies)]
    return cfg, visual, feats


def record(benchmark, fn, rotate):
    """Run under pytest-benchmark, and on GPU also store the CUDA-event timing that is the figure of record."""
    it = iter(range(10**9))
    benchmark(lambda: fn(*rotate[next(it) % len(rotate)]))
    if CUDA:
        t = measure(fn, rotate=rotate, warmup=3, iters=20)
        benchmark.extra_info.update(cuda_median_ms=t.median_ms, cuda_p20_ms=t.p20_ms, cuda_p80_ms=t.p80_ms)


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("impl", ["dispatch", "reference"])
def test_pool_forward(benchmark, preset, batch, dtype, impl):
    cfg, _, feats = make_inputs(preset, batch, dtype)
    op = pool if impl == "dispatch" else pool_reference

    def run(*features):
        return [op(f, e.grid, cfg.visual.pool_size) for f, e in zip(features, cfg.encoders)]

    record(benchmark, run, [tuple(f) for f in feats])


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("impl", ["dispatch", "reference"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_project_fuse(benchmark, preset, batch, dtype, impl, backward):
    cfg, visual, feats = make_inputs(preset, batch, dtype)
    pooled = [tuple(visual.pool(list(f))) for f in feats]
    op = project_fuse if impl == "dispatch" else project_fuse_reference
    weights, biases = [p.weight for p in visual.projectors], [p.bias for p in visual.projectors]
    fusion = visual.fusion.weights() if visual.fusion is not None else None

    def run(*p):
        out, _ = op(list(p), weights, biases, fusion)
        if backward:
            out.sum().backward()
        return out

    record(benchmark, run, pooled)
