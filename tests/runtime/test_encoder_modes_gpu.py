"""CUDA checks of the encoder runner (marked `gpu`: skipped without CUDA, run by `merv-fast gpu-suite`): streams and
graph equal sequential to bf16 tolerance at merv-7b shapes, and a profiler trace shows kernels of different encoders
(each on its own stream) running at the same time."""

from __future__ import annotations

import json

import pytest
import torch

import merv_fast
from merv_fast.config import EncoderRuntime
from merv_fast.runtime.encoders import EncoderRunner

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = merv_fast.build_model("merv-7b", device="cuda", llm__num_layers=1)  # the encoders are what is tested
    return m


def pixels(cfg, batch, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, e.frames, 3, e.image_size, e.image_size, device="cuda", generator=g,
                        dtype=torch.bfloat16) for e in cfg.encoders]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", ["streams", "graph"])
@pytest.mark.parametrize("is_image", [False, True])
def test_concurrent_modes_equal_sequential(model, mode, is_image):
    sequential = EncoderRunner(model.encoders, EncoderRuntime(mode="sequential"))
    runner = EncoderRunner(model.encoders, EncoderRuntime(mode=mode))
    with torch.no_grad():
        for batch, seed in ((3, 1), (2, 2), (3, 3)):  # graph: the bucket of 4 captured once, replayed with new data
            x = pixels(model.config, batch, seed)
            want = sequential(x, is_image)
            got = runner(x, is_image)
            torch.cuda.synchronize()
            for e, a, b in zip(model.config.encoders, got, want):
                assert a.shape == b.shape and rel_err(a, b) < 1e-2, (mode, e.name, rel_err(a, b))
    if mode == "graph":
        assert len(runner.graph_keys) == 2  # batch 3 -> bucket 4 (captured once, replayed twice), batch 2 -> 2
    else:
        assert runner.graph_keys == []


def kernels_by_stream(trace_path) -> dict[int, list[tuple[float, float]]]:
    events = json.loads(open(trace_path).read())["traceEvents"]
    streams: dict[int, list[tuple[float, float]]] = {}
    for ev in events:
        if ev.get("cat") == "kernel" and "dur" in ev:
            streams.setdefault(int(ev["args"]["stream"]), []).append((float(ev["ts"]), float(ev["ts"] + ev["dur"])))
    return streams


def overlapping_kernels(streams) -> int:
    """How many pairs of kernels ran at the same time (their [start, end) intervals intersect). Kernels of one stream
    run one after another, so any such pair ran on different streams."""
    spans = sorted(span for kernels in streams.values() for span in kernels)
    count, latest_end = 0, []
    for start, end in spans:
        latest_end = [e for e in latest_end if e > start]
        count += len(latest_end)
        latest_end.append(end)
    return count


@pytest.mark.parametrize("mode", ["streams", "graph"])
def test_profiler_trace_shows_encoders_overlapping(model, mode, tmp_path):
    runner = EncoderRunner(model.encoders, EncoderRuntime(mode=mode))
    x = pixels(model.config, 1, 4)
    with torch.no_grad():
        runner(x)  # warm-up (and the capture, in graph mode)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            runner(x)
            torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    streams = kernels_by_stream(trace)
    layout = sorted((s, len(k)) for s, k in streams.items())
    if mode == "streams":  # one side stream per encoder, each running that encoder's many kernels
        busy = [s for s, k in streams.items() if len(k) >= 10]
        assert len(busy) >= len(model.config.encoders), layout
    # (a graph's kernels may be reported on the stream that launched it; their times still show concurrency)
    assert overlapping_kernels(streams) > 0, f"no two kernels ran at the same time; kernels per stream: {layout}"


def test_prefetched_encoders_train_like_encoders_in_the_step():
    """`encoders.prefetch`: the next micro-batch encoded on the CUDA prefetcher's side stream gives the same training
    steps as encoding it in the step (tiny preset, bf16 autocast)."""
    import sys
    from pathlib import Path

    from merv_fast.data.prefetch import CudaPrefetcher
    from merv_fast.train.parallel import TrainModule
    from merv_fast.train.step import Stepper

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from helpers import make_batch

    batches = [make_batch(kind, 2, 20, 6, seed=i) for i, kind in enumerate(["video", "image", "video", "text"])]
    losses = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = merv_fast.build_model("tiny", device="cuda",
                                      **{"encoders.prefetch": prefetch, "encoders.mode": "graph"})
        module = TrainModule(model)
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        stepper = Stepper(module, opt, None, device=torch.device("cuda"), autocast_dtype=torch.bfloat16)
        assert stepper.prefetch_encoders == prefetch
        losses[prefetch] = [stepper.step([p]).loss
                            for p in CudaPrefetcher(batches, "cuda", stepper.prepare_on_device)]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-3, atol=1e-4)
