"""GPU-suite area `encoder-modes`: the four frozen encoders' forward, release-style vs ours in each runner mode, and
whether `encoders.prefetch` (the next micro-batch encoded on a side stream during the LLM step) pays.

Rows (merv-7b shapes, batch 8, bf16 on a GPU; the tiny preset, batch 1, fp32 on a CPU, where every mode is
sequential and only the code path is exercised):
- `encoders {video|image} B=8 {mode}`: ours (SDPA, only the blocks up to the layer taken, images' per-frame encoders
  encoded once and tiled) in sequential | streams | graph, against release-style (sequential, eager attention,
  every layer of every checkpoint built and run, images encoded as 32 repeated frames). FLOPs: the work ours does
  (7.2 TFLOP per video at merv-7b, less for images), so share_of_ceiling is against the measured bf16 matmul peak.
- `prefetch overlap: training step ...`: optimizer steps of the merv-1b preset (tiny on CPU) through the CUDA
  prefetcher with `encoders.prefetch` on vs off, same data and weights.
- a stream timeline PNG of one streams-mode forward from the profiler, when matplotlib is there (GPU only).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from merv_fast.config import ENCODER_MODES, EncoderRuntime, get_preset
from merv_fast.measure.gpu_areas import DEVICE, FULL, _dtype_name, release_memory
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure, summarize
from merv_fast.model.flops import encoder_forward_flops
from merv_fast.runtime.encoders import EncoderRunner, is_per_frame

RELEASE = "release-style: sequential, eager attention, all layers built and run"
WARMUP, ITERS = (3, 10) if FULL else (1, 1)  # on a CPU the area only exercises the code path


def build_encoders(cfg, dtype, release_style: bool) -> nn.ModuleDict:
    from merv_fast.model.encoders import build_encoder

    encoders = nn.ModuleDict()
    for e in cfg.encoders:
        if release_style:
            e = dataclasses.replace(e, layers_run=e.num_layers, attention="eager")
        with DEVICE:
            encoders[e.name] = build_encoder(e).to(dtype).eval()
    return encoders.requires_grad_(False)


def forward_flops(cfg, is_image: bool) -> float:
    """What ours computes per sample: an image's per-frame encoders see one frame instead of all of theirs."""
    return sum(encoder_forward_flops(e) / (e.frames if is_image and is_per_frame(e) else 1) for e in cfg.encoders)


def _pixels(cfg, batch, dtype, is_image, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for e in cfg.encoders:
        shape = (batch, 1 if is_image else e.frames, 3, e.image_size, e.image_size)
        x = torch.randn(shape, device=DEVICE, dtype=torch.float32, generator=g).to(dtype)
        out.append(x.expand(batch, e.frames, *shape[2:]) if is_image else x)
    return out


def encoder_modes(results: ResultsFile, ceilings: dict) -> None:
    preset, batch, dtype = ("merv-7b", 8, torch.bfloat16) if FULL else ("tiny", 1, torch.float32)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    release = EncoderRunner(build_encoders(cfg, dtype, release_style=True))
    ours = build_encoders(cfg, dtype, release_style=False)
    for is_image in (False, True):
        kind = "image" if is_image else "video"
        rotate = [(_pixels(cfg, batch, dtype, is_image, seed),) for seed in range(2)]
        # the release materialised an image's 32 repeated frames; ours take the pipeline's expanded view
        rotate_release = [([x.contiguous() for x in px],) for (px,) in rotate]
        config = {"preset": preset, "batch": batch, "dtype": _dtype_name(dtype), "kind": kind,
                  "device_modes": "as named" if DEVICE.type == "cuda" else "all sequential (no CUDA)"}
        with torch.no_grad():
            # the release encodes an image as its 32 repeated frames through every encoder: no tiling
            reference = measure(lambda px: release(px, False), rotate=rotate_release, warmup=WARMUP, iters=ITERS)
            for mode in ENCODER_MODES:
                runner = EncoderRunner(ours, EncoderRuntime(mode=mode))
                timing = measure(lambda px: runner(px, is_image), rotate=rotate, warmup=WARMUP, iters=ITERS)
                results.append(row("encoder-modes", f"encoders {kind} B={batch} {mode}", {**config, "mode": mode},
                                   timing, reference, reference_name=RELEASE,
                                   flops=forward_flops(cfg, is_image) * batch, ceilings=ceilings))
                del runner
        release_memory()
    if DEVICE.type == "cuda":
        timeline_png(results, EncoderRunner(ours, EncoderRuntime(mode="streams")), _pixels(cfg, 1, dtype, False, 0))
    del release, ours
    release_memory()
    prefetch_overlap(results, ceilings)


def timeline_png(results: ResultsFile, runner: EncoderRunner, pixels) -> None:
    """One streams-mode forward under the profiler: kernels per stream over time, beside the results file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with torch.no_grad():
        runner(pixels)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner(pixels)
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    if not events:
        return
    start = min(e["ts"] for e in events)
    streams = sorted({e["args"]["stream"] for e in events})
    fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * len(streams)))
    for i, s in enumerate(streams):
        spans = [((e["ts"] - start) / 1e3, e["dur"] / 1e3) for e in events if e["args"]["stream"] == s]
        ax.broken_barh(spans, (i - 0.4, 0.8))
    ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
    ax.set_xlabel("ms")
    ax.set_title("encoders, streams mode: CUDA kernels per stream (one encoder per side stream)")
    fig.tight_layout()
    fig.savefig(results.path.with_name(results.path.stem + "_encoder-streams.png"), dpi=120)
    plt.close(fig)


def prefetch_overlap(results: ResultsFile, ceilings: dict) -> None:
    """Training steps through the CUDA prefetcher with the next micro-batch's encoders on its side stream (on) or
    in the step (off). On a CPU there is no prefetcher and the flag is a no-op: both rows time the same step."""
    from merv_fast.data.collate import Batch
    from merv_fast.data.prefetch import CudaPrefetcher
    from merv_fast.data.synthetic import synthetic_batches
    from merv_fast.model.merv import build_model
    from merv_fast.train.optim import build_optimizer
    from merv_fast.train.parallel import TrainModule, apply_activation_checkpointing
    from merv_fast.train.step import Stepper

    preset, batch, steps, warmup = ("merv-1b", 8, 6, 2) if FULL else ("tiny", 2, 2, 1)
    cfg = get_preset(preset)
    hosts = []
    for b in synthetic_batches(cfg, batch, 128, count=2, seed=0):
        n = b.input_ids.shape[0]
        hosts.append(Batch(b.input_ids, b.attention_mask.bool(), b.labels, b.frames, torch.zeros(n, dtype=torch.bool),
                           b.flip, "video"))
    timings = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = build_model(preset, device=DEVICE, **{"encoders.prefetch": prefetch})
        apply_activation_checkpointing(model.llm, "full" if FULL else "off")
        module = TrainModule(model)
        optimizer = build_optimizer(module, lr=1e-5, weight_decay=0.1)
        stepper = Stepper(module, optimizer, None, device=DEVICE,
                          autocast_dtype=torch.bfloat16 if DEVICE.type == "cuda" else None)
        loader = [hosts[i % len(hosts)] for i in range(warmup + steps)]
        source = CudaPrefetcher(loader, DEVICE, stepper.prepare_on_device) if DEVICE.type == "cuda" else \
            (stepper.prepare_on_device(b.to(DEVICE)) for b in loader)
        times = []
        t0 = time.perf_counter()
        for i, prepared in enumerate(source):
            stepper.step([prepared])  # reads the loss: the step's GPU work is done when it returns
            now = time.perf_counter()
            if i >= warmup:
                times.append((now - t0) * 1e3)
            t0 = now
        timings[prefetch] = summarize(times)
        del model, module, optimizer, stepper, source
        release_memory()
    results.append(row("encoder-modes", f"prefetch overlap: training step {preset} B={batch}",
                       {"preset": preset, "batch": batch, "steps": steps, "prefetcher": DEVICE.type == "cuda"},
                       timings[True], timings[False], reference_name="encoders.prefetch=false (encoders in the step)",
                       ceilings=ceilings, samples_per_s=batch / (timings[True].median_ms / 1e3)))


register_area("encoder-modes", encoder_modes, budget_s=300, after="encoders")
