"""The GPU suite's measurement areas so far: the visual path, the frozen encoders, and the main job's training
step (MERV vs its single-encoder baseline, and `merv-fast plan`'s prediction of it beside the measurement). Each runs
in its own subprocess under the suite's time budget."""

from __future__ import annotations

import gc
import tempfile

import torch

from merv_fast.config import get_preset
from merv_fast.kernels.project_fuse import ReleaseFusion
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _with_backward(fn, backward: bool):
    def run(*args):
        out = fn(*args)
        if backward:
            out.float().sum().backward()
    return run


def visual_area(results: ResultsFile, ceilings: dict) -> None:
    """Fused pooling and projection+fusion (Triton) vs the release's modules, forward and forward+backward, and
    the bare cuBLAS products of the same shapes (forward GEMM + weight-gradient GEMM): the floor."""
    from merv_fast.kernels.pooling import pool_concat, pool_concat_reference
    from merv_fast.kernels.project_fuse import project_fuse_concat
    from merv_fast.model.visual import VisualPath

    preset, batches, dtype = ("merv-7b", (1, 8, 16), torch.bfloat16) if FULL else ("tiny", (2,), torch.float32)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, dtype)
    grids, size = [e.grid for e in cfg.encoders], cfg.visual.pool_size
    weights, biases = [p.weight for p in visual.projectors], [p.bias for p in visual.projectors]
    fusion = visual.fusion.weights()
    release = ReleaseFusion(weights, biases, fusion, visual.fusion.attention.state_dict())
    offsets, d, k = visual.offsets, cfg.llm.hidden_size, sum(e.hidden_size for e in cfg.encoders)
    element = torch.finfo(dtype).bits // 8
    for batch in batches:
        config = {"preset": preset, "batch": batch, "dtype": _dtype_name(dtype)}
        feats = _features(cfg, batch, dtype)
        rotate = [tuple(f) for f in feats]
        moved = (sum(f.numel() for f in feats[0]) + batch * cfg.num_visual_tokens * k) * element
        results.append(row("kernels", f"pool_concat {preset} B={batch}", config,
                           measure(lambda *f: pool_concat(list(f), grids, size), rotate=rotate),
                           measure(lambda *f: pool_concat_reference(list(f), grids, size), rotate=rotate),
                           reference_name="release: AdaptiveAvgPool3d per encoder + cat + mean",
                           bytes=moved, ceilings=ceilings))
        pooled = [pool_concat(list(f), grids, size) for f in feats]
        gemm_flops = 2 * batch * cfg.num_visual_tokens * k * d
        for backward in (False, True):
            leaves = [(p.detach().clone(), m.detach().clone()) for p, m in pooled]
            # as the model calls it: the projector weights concatenated on every call (autograd splits the grads)
            ours = _with_backward(lambda p, m: project_fuse_concat(p, m, offsets, torch.cat(weights, 1),
                                                                   torch.stack(biases), fusion)[0], backward)
            ref = _with_backward(lambda p, m: release([p[..., lo:hi] for lo, hi in zip(offsets, offsets[1:])]),
                                 backward)
            label = "fwd+bwd" if backward else "fwd"
            r = row("kernels", f"project_fuse {label} {preset} B={batch}", config,
                    measure(ours, rotate=leaves), measure(ref, rotate=leaves),
                    reference_name="release: E nn.Linear + nn.MultiheadAttention weights + weighted sum",
                    flops=gemm_flops * (2 if backward else 1),
                    ceilings=ceilings)
            floor = _gemm_floor(batch * cfg.num_visual_tokens, k, d, dtype, backward)
            r["floor"] = {"name": "cuBLAS forward GEMM" + (" + weight-gradient GEMM" if backward else ""),
                          "median_ms": floor.median_ms}
            r["ratio_to_floor"] = round(r["ours"]["median_ms"] / floor.median_ms, 3)
            results.append(r)
        if FULL and batch == 8:
            _tma_vs_pointer(results, ceilings, pooled[0][0], k, d, config)
        del feats, pooled
        release_memory()


def _tma_vs_pointer(results: ResultsFile, ceilings: dict, pooled: torch.Tensor, k: int, d: int, config: dict) -> None:
    """On sm_90 and newer, each projection kernel in the variant the GPU runs (TMA) vs its pointer variant (the
    sm_80 path), each autotuned on its own: whether TMA pays. The launchers are called directly, not through
    autograd, whose backward thread would not see `use_target`."""
    from merv_fast.kernels import project_fuse_triton as kernels
    from merv_fast.kernels.dispatch import TMA_MIN_ARCH, target_arch, use_target

    if (target_arch(pooled) or 0) < TMA_MIN_ARCH:
        return
    b, length, _ = pooled.shape
    weight = torch.randn(d, k, device=DEVICE, dtype=pooled.dtype) * k**-0.5
    grad_out = torch.randn(b, length, d, device=DEVICE, dtype=pooled.dtype)
    scales, bias_mix = torch.rand(b, k, device=DEVICE), torch.randn(b, d, device=DEVICE)
    launches = {"forward": lambda: kernels.forward(pooled, scales, weight, bias_mix),
                "weight+mix gradient": lambda: kernels.weight_mix_grad(pooled, grad_out, scales, weight, True),
                "pooled gradient": lambda: kernels.pooled_grad(grad_out, scales, weight)}
    variant = "tma" if kernels.uses_tma(pooled, weight, grad_out) else "pointer (tensors not 16-byte aligned)"
    for name, fn in launches.items():
        with use_target(80):
            pointer = measure(fn)
        results.append(row("kernels", f"project_fuse {name} kernel: TMA vs pointer loads B={b}",
                           {**config, "variant": variant}, measure(fn), pointer,
                           reference_name="the same kernel with pointer loads (its sm_80 variant)",
                           flops=2 * b * length * k * d, ceilings=ceilings))


def _gemm_floor(rows: int, k: int, d: int, dtype, backward: bool):
    """The bare products a fused projection cannot beat: A[rows, K] @ W^T and, for backward, dY^T @ A."""
    a = [torch.randn(rows, k, device=DEVICE, dtype=dtype) for _ in range(2)]
    w = torch.randn(d, k, device=DEVICE, dtype=dtype)
    dy = torch.randn(rows, d, device=DEVICE, dtype=dtype)

    def products(x):
        y = x @ w.T
        return (y, dy.T @ x) if backward else y

    return measure(products, rotate=[(x,) for x in a])


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
    from merv_fast.plan.check import as_run, prediction_row
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
    # `merv-fast plan`'s prediction of the same step (one process, the bench's batch and checkpointing)
    batch = report["config"]["batch_size"]
    predicted = prediction_row(
        f"bench training step {merv['preset']}", as_run(merv["preset"]), ranks=1, global_batch=batch,
        micro_batch=batch, text_tokens=merv["padded_text_tokens_mean"], max_text_tokens=merv["padded_text_tokens"],
        checkpointing="full" if report["config"]["activation_checkpointing"] else "off",
        frame_bytes=merv["frame_bytes_per_sample"], prefetch=False, ceilings=ceilings,
        step_times_s=merv["step_times_s"], peak_bytes=merv["peak_mem_bytes"])
    if predicted is not None:
        results.append(predicted)


import merv_fast.measure.smoke_areas  # noqa: E402,F401 - registers "kernel-smoke", which "train" follows

# The headline first: the training step right after the kernel smoke test, then the visual path; the encoders'
# forward after the full GPU tests (estimates: seconds on an H100, model builds and first compiles included).
register_area("train", train_area, budget_s=300, after="kernel-smoke", estimate_s=180)
register_area("visual", visual_area, budget_s=240, after="train", estimate_s=120)
register_area("encoders", encoders_area, budget_s=240, after="gpu-tests", estimate_s=60)
