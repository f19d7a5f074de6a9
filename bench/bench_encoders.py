"""pytest-benchmark suite: the frozen encoders' forward (no_grad), each on its own and all four in turn.

Concurrency modes (`mode`): the encoder runner's sequential | streams | graph (merv_fast/runtime/encoders.py), the
path MERV.encode takes; on a CPU every mode runs sequential.
CPU/CI: the tiny preset in fp32, run once as tests (`--benchmark-disable`). GPU: merv-7b encoders at full size in
bf16, B=1 and 2 videos; the figure of record is the CUDA-event median in `extra_info["cuda_median_ms"]`, inputs
rotated across iterations.
Measure: `python -m pytest bench/bench_encoders.py --benchmark-enable --benchmark-json out.json`.
"""


import pytest
import torch
from torch import nn

from merv_fast.config import ENCODER_MODES, EncoderRuntime, get_preset
from merv_fast.measure.pytest_bench import record
from merv_fast.model.encoders import build_encoder
from merv_fast.model.flops import encoder_forward_flops
from merv_fast.runtime.encoders import EncoderRunner

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = [("merv-7b", b, torch.bfloat16) for b in (1, 2)] if CUDA else [("tiny", 1, torch.float32)]
MODES = list(ENCODER_MODES)
ENCODER_NAMES = [e.name for e in get_preset("merv-7b").encoders]


def build(enc_cfg, dtype):
    torch.manual_seed(0)
    with DEVICE:
        return build_encoder(enc_cfg).to(dtype).eval()


def pixels_for(enc_cfg, batch, dtype, copies=2):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return [torch.randn(batch, enc_cfg.frames, 3, enc_cfg.image_size, enc_cfg.image_size, device=DEVICE,
                        generator=g).to(dtype) for _ in range(copies)]


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_forward(benchmark, preset, batch, dtype, name):
    enc_cfg = next(e for e in get_preset(preset).encoders if e.name == name)
    encoder = build(enc_cfg, dtype)
    rotate = [(px,) for px in pixels_for(enc_cfg, batch, dtype)]

    @torch.no_grad()
    def run(px):
        return encoder(px)

    out = run(*rotate[0])
    assert out.shape[:2] == (batch, enc_cfg.time_steps) and out.shape[-1] == enc_cfg.hidden_size
    benchmark.extra_info.update(gflop=encoder_forward_flops(enc_cfg) * batch / 1e9, layers=enc_cfg.layers_run)
    record(benchmark, run, rotate, warmup=2, iters=10)


@pytest.mark.parametrize("preset,batch,dtype", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_all_encoders(benchmark, preset, batch, dtype, mode):
    """The model's whole encoder stage: every encoder on its own inputs, in the given concurrency mode."""
    cfgs = get_preset(preset).encoders
    runner = EncoderRunner(nn.ModuleDict({e.name: build(e, dtype) for e in cfgs}), EncoderRuntime(mode=mode))
    copies = [pixels_for(e, batch, dtype) for e in cfgs]
    rotate = [tuple(c[i] for c in copies) for i in range(2)]

    @torch.no_grad()
    def run(*pixels):
        return runner(list(pixels))

    assert len(run(*rotate[0])) == len(cfgs)
    benchmark.extra_info.update(gflop=sum(encoder_forward_flops(e) for e in cfgs) * batch / 1e9)
    record(benchmark, run, rotate, warmup=2, iters=10)
