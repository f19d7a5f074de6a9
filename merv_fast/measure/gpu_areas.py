"""The GPU suite's measurement areas so far: the visual path, the frozen encoders, and the main job's training
step (MERV vs its single-encoder baseline). Each runs in its own subprocess under the suite's time budget."""

from __future__ import annotations

import gc
import tempfile

import torch

from merv_fast.config import get_preset
from merv_fast.kernels.pooling import pool
from merv_fast.kernels.project_fuse import ReleaseFusion, project_fuse
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure, summarize
from merv_fast.model.flops import encoder_forward_flops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Full-size shapes on a GPU; on a CPU (`gpu-suite --allow-cpu`, the tests) the same code runs at tiny shapes.
FULL = DEVICE.type == "cuda"


def release_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _features(cfg, batch: int, dtype, copies: int = 3) -> list[list[torch.Tensor]]:
    return [[torch.randn(batch, e.time_steps, e.tokens_per_step, e.hidden_size, device=DEVICE, dtype=dtype)
             for e in cfg.encoders] for _ in range(copies)]


def visual_area(results: ResultsFile, ceilings: dict) -> None:
    from merv_fast.model.visual import VisualPath

    preset, batch, dtype = ("merv-7b", 8, torch.bfloat16) if FULL else ("tiny", 2, torch.float32)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, dtype)
    feats = _features(cfg, batch, dtype)
    config = {"preset": preset, "batch": batch, "dtype": str(dtype).replace("torch.", "")}

    def pool_all(*features):
        return [pool(f, e.grid, cfg.visual.pool_size) for f, e in zip(features, cfg.encoders)]

    element = torch.finfo(dtype).bits // 8
    read = sum(f.numel() for f in feats[0]) * element
    written = sum(batch * cfg.visual.num_tokens * e.hidden_size for e in cfg.encoders) * element
    results.append(row("kernels", f"pool {preset} B={batch} (torch path)", config,
                       measure(pool_all, rotate=[tuple(f) for f in feats]), bytes=read + written, ceilings=ceilings))

    pooled = [pool_all(*f) for f in feats]
    weights, biases = [p.weight for p in visual.projectors], [p.bias for p in visual.projectors]
    fusion = visual.fusion.weights()
    release = ReleaseFusion(weights, biases, fusion, visual.fusion.attention.state_dict())
    k = sum(e.hidden_size for e in cfg.encoders)
    fwd_flops = 2 * batch * cfg.visual.num_tokens * k * cfg.llm.hidden_size
    for backward in (False, True):
        def ours(*p):
            out, _ = project_fuse(list(p), weights, biases, fusion)
            if backward:
                out.sum().backward()

        def reference(*p):
            out = release(list(p))
            if backward:
                out.sum().backward()

        rotate = [tuple(p) for p in pooled]
        label = "fwd+bwd" if backward else "fwd"
        results.append(row("kernels", f"project_fuse {label} {preset} B={batch} (torch path)", config,
                           measure(ours, rotate=rotate), measure(reference, rotate=rotate),
                           reference_name="release modules (nn.Linear + nn.MultiheadAttention)",
                           flops=fwd_flops * (3 if backward else 1), ceilings=ceilings))


def encoders_area(results: ResultsFile, ceilings: dict) -> None:
    """Forward of each frozen encoder at full size, bf16, no_grad, up to the layer taken."""
    from merv_fast.model.encoders import build_encoder

    preset, batch, dtype = ("merv-7b", 2, torch.bfloat16) if FULL else ("tiny", 1, torch.float32)
    for enc_cfg in get_preset(preset).encoders:
        with DEVICE:
            encoder = build_encoder(enc_cfg).to(dtype).eval()
        pixels = [(torch.randn(batch, enc_cfg.frames, 3, enc_cfg.image_size, enc_cfg.image_size, device=DEVICE,
                               dtype=dtype),) for _ in range(2)]
        with torch.no_grad():
            timing = measure(encoder, rotate=pixels, warmup=2, iters=10)
        results.append(row("encoders", f"{enc_cfg.name} forward B={batch} videos ({enc_cfg.layers_run} layers)",
                           {"preset": preset, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                            "attention": "sdpa"},
                           timing, flops=encoder_forward_flops(enc_cfg) * batch, ceilings=ceilings))
        del encoder, pixels
        release_memory()


def train_area(results: ResultsFile, ceilings: dict) -> None:
    """The main job on the GPU: training steps of MERV and of its single-encoder baseline on the same data."""
    from merv_fast.train.bench import BenchSettings, run_bench

    with tempfile.TemporaryDirectory() as out:
        steps, warmup = (5, 2) if FULL else (4, 1)
        report = run_bench(BenchSettings(steps=steps, warmup=warmup, out=out))  # merv-1b on a GPU, tiny on CPU
    merv, base = report["merv"], report["baseline"]
    config = {k: report["config"][k] for k in ("preset", "baseline", "batch_size", "text_tokens",
                                               "activation_checkpointing")}
    config["phases_s"] = {side: {k: round(v, 5) for k, v in r["phases"].items()}
                          for side, r in (("merv", merv), ("baseline", base))}
    results.append(row("train", f"training step {merv['preset']} vs {base['preset']}", config,
                       summarize([t * 1e3 for t in merv["step_times_s"]]),
                       summarize([t * 1e3 for t in base["step_times_s"]]),
                       reference_name=f"{base['preset']} (same data and settings)",
                       flops=merv["flops_per_sample"] * report["config"]["batch_size"], ceilings=ceilings,
                       samples_per_s=merv["samples_per_s"], tokens_per_s=merv["tokens_per_s"], mfu=merv["mfu"]))


register_area("visual", visual_area, budget_s=240, after="gpu-tests")
register_area("encoders", encoders_area, budget_s=240, after="visual")
register_area("train", train_area, budget_s=300, after="encoders")
