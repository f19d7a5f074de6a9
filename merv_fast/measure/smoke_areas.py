"""GPU-suite area `kernel-smoke`, run right after the ceilings: is every Triton kernel right on this GPU, in bf16,
and do the encoder runner's modes agree, before any minute goes to timing them.

Each Triton kernel runs once at the model's shapes (merv-7b visual path at batch 1, merv-1b LLM widths) in bf16 on
CUDA, against its torch reference on the same bf16 values computed in fp32; one row per kernel with the relative
error (by norm) and its bound. Then the four merv-7b encoders in `streams` and `graph` mode against `sequential`.
Any error over its bound fails the area (the rows stay in the results file). Budget: about 60 s on an H100, most
of it Triton's first compile of each kernel's autotune configs.

Without CUDA (`gpu-suite --allow-cpu`, the tests) the same checks run at tiny shapes in fp32, the kernels in
Triton's interpreter (the area's subprocess gets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import time

import torch

from merv_fast.config import ENCODER_MODES, EncoderRuntime, get_preset
from merv_fast.measure.results import ResultsFile
from merv_fast.measure.suite import register_area

# As gpu_areas.py has them; not imported from there, whose areas register after this one (see the end of the file).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if FULL else torch.float32
# Relative error by norm against fp32 on the same inputs: bf16 outputs carry their own rounding (2^-9 relative).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


class _Checks:
    """Collects (name, relative error, bound) rows; `finish` fails the area if any is over its bound."""

    def __init__(self, results: ResultsFile, preset: str):
        self.results, self.preset, self.failed = results, preset, []

    def add(self, name: str, errors: dict[str, float], bound: float, seconds: float, **config) -> None:
        worst = max(errors.values())
        self.results.append({
            "area": "kernel-smoke", "name": name,
            "config": {"preset": self.preset, "dtype": str(DTYPE).removeprefix("torch."), "device": DEVICE.type,
                       **config},
            "tests": {"max_rel_err": float(f"{worst:.3g}"), "bound": bound, "ok": worst <= bound,
                      "seconds": round(seconds, 2)}})
        if not worst <= bound:
            self.failed.append(f"{name}: {', '.join(f'{k} {v:.2e}' for k, v in errors.items())} > {bound:g}")

    def finish(self) -> None:
        if self.failed:
            raise AssertionError("kernel smoke failed: " + "; ".join(self.failed))


def _randn(*shape, dtype=DTYPE, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _visual_kernels(checks: _Checks, cfg) -> None:
    from merv_fast.kernels.pooling import (pool_concat_backward_reference, pool_concat_backward_triton,
                                           pool_concat_reference, pool_concat_triton)
    from merv_fast.kernels.project_fuse import project_fuse_concat
    from merv_fast.kernels.project_fuse_triton import uses_tma
    from merv_fast.kernels import use_backend
    from merv_fast.model.visual import VisualPath

    grids, size = [tuple(e.grid) for e in cfg.encoders], tuple(cfg.visual.pool_size)
    feats = [_randn(1, e.time_steps, e.tokens_per_step, e.hidden_size) for e in cfg.encoders]
    start = time.perf_counter()
    pooled, means = pool_concat_triton(feats, grids, size)
    ref_pooled, ref_means = pool_concat_reference([f.float() for f in feats], grids, size)
    checks.add("pool_concat forward", {"pooled": _rel(pooled, ref_pooled), "means": _rel(means, ref_means)},
               TOLERANCE[DTYPE], time.perf_counter() - start)

    start = time.perf_counter()
    grad_pooled, grad_means = torch.randn_like(pooled), torch.randn_like(means)
    shapes = [tuple(f.shape) for f in feats]
    grads = pool_concat_backward_triton(grad_pooled, grad_means, shapes, grids, size)
    refs = pool_concat_backward_reference(grad_pooled.float(), grad_means.float(), shapes, grids, size)
    checks.add("pool_concat backward", {f"encoder {e}": _rel(g, r) for e, (g, r) in enumerate(zip(grads, refs))},
               TOLERANCE[DTYPE], time.perf_counter() - start)

    torch.manual_seed(0)
    visual = VisualPath(cfg, cfg.llm.hidden_size).to(DEVICE, DTYPE)
    weight = torch.cat([p.weight for p in visual.projectors], 1).detach()
    bias = torch.stack([p.bias for p in visual.projectors]).detach()
    fusion = visual.fusion.weights(DTYPE)
    grad_out = _randn(1, cfg.num_visual_tokens, cfg.llm.hidden_size)
    outs = {}
    start = time.perf_counter()
    for backend, dtype in (("triton", DTYPE), ("torch", torch.float32)):
        w = weight.to(dtype).requires_grad_()
        p = pooled.to(dtype).requires_grad_()
        with use_backend(backend):
            out, mix = project_fuse_concat(p, p.mean(1), visual.offsets, w, bias.to(dtype),
                                           _fusion_as(fusion, dtype))
            grad_w, grad_p = torch.autograd.grad(out, (w, p), grad_out.to(dtype))
        outs[backend] = (out, mix, grad_w, grad_p)
    errors = {name: _rel(a, b) for name, a, b in zip(("out", "mix", "grad_weight", "grad_pooled"),
                                                       outs["triton"], outs["torch"])}
    # Which variant of its kernels ran: TMA on sm_90 and newer where the tensors allow a descriptor
    variant = "tma" if uses_tma(pooled, weight, grad_out) else "pointer"
    checks.add("project_fuse forward+backward", errors, TOLERANCE[DTYPE], time.perf_counter() - start,
               kernel_variant=variant)
    del visual, feats, grads, refs


def _fusion_as(fusion, dtype):
    from merv_fast.kernels.project_fuse import FusionWeights

    return FusionWeights(*(t.detach().to(dtype) for t in (fusion.query, fusion.q_weight, fusion.q_bias,
                                                           fusion.k_weight, fusion.k_bias)))


def _preprocess(checks: _Checks, cfg) -> None:
    from merv_fast.data.preprocess import encoder_input_spec
    from merv_fast.kernels.preprocess import preprocess_reference
    from merv_fast.kernels.preprocess_triton import preprocess_triton

    h, w = (360, 640) if FULL else (40, 56)
    # On a CPU (the interpreter) two frames, which every spec's frame stride still takes one of: the check there is
    # of the code path, and each interpreted program costs milliseconds.
    count = cfg.frames_sampled if FULL else 2
    frames = torch.randint(0, 256, (1, count, h, w, 3), dtype=torch.uint8, device=DEVICE)
    flip = torch.tensor([True], device=DEVICE)
    specs = [encoder_input_spec(e, cfg.frames_sampled, DTYPE) for e in cfg.encoders]
    ref_specs = [encoder_input_spec(e, cfg.frames_sampled, torch.float32) for e in cfg.encoders]
    start = time.perf_counter()
    got = preprocess_triton(frames, specs, flip)
    want = preprocess_reference(frames, ref_specs, flip)
    checks.add("preprocess", {e.name: _rel(g, r) for e, g, r in zip(cfg.encoders, got, want)},
               TOLERANCE[DTYPE], time.perf_counter() - start, frame_size=f"{h}x{w}")


def _llama_kernels(checks: _Checks, llm) -> None:
    from merv_fast.kernels.rms_norm import rms_norm_backward_triton, rms_norm_reference, rms_norm_triton
    from merv_fast.kernels.rope import apply_rotary_reference, rotate_triton
    from merv_fast.kernels.swiglu import swiglu_backward_triton, swiglu_reference, swiglu_triton

    seq = 1152 if FULL else 40
    x, weight = _randn(2, seq, llm.hidden_size), _randn(llm.hidden_size)
    start = time.perf_counter()
    y, rstd = rms_norm_triton(x, weight, 1e-5)
    x32, w32 = x.float().requires_grad_(), weight.float().requires_grad_()
    ref = rms_norm_reference(x32, w32, 1e-5)
    grad_y = torch.randn_like(y)
    grad_x, grad_w = rms_norm_backward_triton(grad_y, x, weight, rstd)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x32, w32), grad_y.float())
    checks.add("rms_norm forward+backward", {"y": _rel(y, ref), "grad_x": _rel(grad_x, ref_gx),
                                             "grad_w": _rel(grad_w, ref_gw)}, TOLERANCE[DTYPE],
               time.perf_counter() - start, width=llm.hidden_size)

    gate, up = _randn(2, seq, llm.intermediate_size), _randn(2, seq, llm.intermediate_size)
    start = time.perf_counter()
    out = swiglu_triton(gate, up)
    g32, u32 = gate.float().requires_grad_(), up.float().requires_grad_()
    ref = swiglu_reference(g32, u32)
    grad_out = torch.randn_like(out)
    grad_gate, grad_up = swiglu_backward_triton(grad_out, gate, up)
    ref_gg, ref_gu = torch.autograd.grad(ref, (g32, u32), grad_out.float())
    checks.add("swiglu forward+backward", {"out": _rel(out, ref), "grad_gate": _rel(grad_gate, ref_gg),
                                           "grad_up": _rel(grad_up, ref_gu)}, TOLERANCE[DTYPE],
               time.perf_counter() - start, width=llm.intermediate_size)

    head_dim = llm.hidden_size // llm.num_heads
    q = _randn(2, seq, llm.num_heads, head_dim).transpose(1, 2)
    k = _randn(2, seq, llm.num_kv_heads, head_dim).transpose(1, 2)
    angles = torch.rand(2, seq, head_dim // 2, device=DEVICE) * 6.3
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DTYPE), torch.cat([angles.sin()] * 2, -1).to(DTYPE)
    start = time.perf_counter()
    got_q, got_k = rotate_triton(q, cos, sin), rotate_triton(k, cos, sin)
    want_q, want_k = apply_rotary_reference(q.float(), k.float(), cos.float(), sin.float())
    back = rotate_triton(got_q, cos, sin, backward=True, dtype=torch.float32)  # the transpose undoes the rotation
    checks.add("rope forward+backward", {"q": _rel(got_q, want_q), "k": _rel(got_k, want_k),
                                         "q back": _rel(back, q.float())}, TOLERANCE[DTYPE],
               time.perf_counter() - start, heads=f"{llm.num_heads}/{llm.num_kv_heads}")


def _encoder_modes(checks: _Checks, cfg) -> None:
    """streams and graph against sequential, same weights and inputs: the same kernels, so the same numbers."""
    from merv_fast.measure.encoder_areas import _pixels, build_encoders
    from merv_fast.measure.gpu_areas import release_memory
    from merv_fast.runtime.encoders import EncoderRunner

    encoders = build_encoders(cfg, DTYPE, release_style=False)
    pixels = _pixels(cfg, 1, DTYPE, False, 0)
    with torch.no_grad():
        want = EncoderRunner(encoders, EncoderRuntime(mode="sequential"))(pixels)
        for mode in [m for m in ENCODER_MODES if m != "sequential"]:
            start = time.perf_counter()
            runner = EncoderRunner(encoders, EncoderRuntime(mode=mode))
            got = runner(pixels)
            got = runner(pixels)  # graph mode captures on its first call and replays from the second
            checks.add(f"encoders {mode} vs sequential", {e.name: _rel(g, w) for e, g, w in
                                                         zip(cfg.encoders, got, want)},
                       1e-6, time.perf_counter() - start)
    del encoders
    release_memory()


def kernel_smoke_area(results: ResultsFile, ceilings: dict) -> None:
    from merv_fast.measure.gpu_areas import release_memory

    torch.manual_seed(0)
    visual_preset, llm_preset = ("merv-7b", "merv-1b") if FULL else ("tiny", "tiny")
    checks = _Checks(results, visual_preset)
    with torch.no_grad():
        _preprocess(checks, get_preset(visual_preset))
    _visual_kernels(checks, get_preset(visual_preset))
    release_memory()
    _llama_kernels(checks, get_preset(llm_preset).llm)
    release_memory()
    _encoder_modes(checks, get_preset(visual_preset))
    checks.finish()


register_area("kernel-smoke", kernel_smoke_area, budget_s=120, after="ceilings", estimate_s=60,
              cpu_env={"TRITON_INTERPRET": "1"})
