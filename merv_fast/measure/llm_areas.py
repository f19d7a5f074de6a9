"""GPU-suite area `llm`: the LLM's training step (forward with the loss + backward) on stage-2-like micro-batches,
padded + plain loss (the release's: batches of 8 grouped by length, padded to the longest, cross-entropy on full
fp32 logits) against padded + fused, packed + plain and packed + fused, under every attention backend available.

Each row: CUDA-event median of the step, real tokens per second (visual + attended text, never padding), the peak
memory of one step, the speedup and the peak memory relative to the padded baseline under sdpa. Packed rows take
the default budget (a whole micro-batch per row); under sdpa they run as the trainer runs them, one SDPA call per
sample (`sdpa_packed`), never on a dense block-diagonal mask.
Shapes: merv-1b's LLM and merv-7b's with SEVEN_B_LAYERS of its 32 layers (what fits the area's 300 s budget and an
80 GB GPU; the row's config says so), fp32 master weights under bf16 autocast as the trainer runs them. The
micro-batches as the length-grouped sampler builds them: 1024 visual tokens + text drawn uniformly from 50-600
tokens, sorted, cut into batches of 8. On a CPU (`gpu-suite --allow-cpu`, the tests) the tiny LLM with text of 5-60
tokens. `bench/bench_llm.py` times the same steps under pytest-benchmark.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from merv_fast.config import apply_overrides, get_preset
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure, peak_memory
from merv_fast.model.attention import availability, backend_of, install, install_for_packing, resolve_attention
from merv_fast.model.llm import IGNORE_INDEX, build_llm, llm_forward, splice_visual_tokens
from merv_fast.train.packing import DEFAULT_PACK_BUDGET, pack

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda"
BATCH = 8
TEXT_TOKENS = (50, 600) if FULL else (5, 60)  # stage-2 text lengths; scaled down with the tiny LLM's 256 visual
PACK_BUDGET = DEFAULT_PACK_BUDGET if FULL else 1024  # tiny: about 3.5 tiny samples (256 visual + 5-60 text)
SEVEN_B_LAYERS = 16
MODES = ("padded+plain", "padded+fused", "packed+plain", "packed+fused")  # padded+fused: the loss on its own
BASELINE = "padded+plain"
BACKEND_ORDER = ("sdpa", "flash_attn", "xformers", "flex")  # flex last: its first steps compile
BASELINE_NAME = "release: padded batches of 8 grouped by length, sdpa, cross-entropy on full fp32 logits"


def llm_config(preset: str):
    cfg = get_preset(preset)
    if preset == "merv-7b":
        cfg = apply_overrides(cfg, {"llm.num_layers": SEVEN_B_LAYERS})
    return cfg


def stage2_micro_batches(cfg, count: int, *, batch: int = BATCH, text: tuple[int, int] = TEXT_TOKENS,
                         device: torch.device = DEVICE, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """`count` micro-batches (ids, mask, labels, visual) as the length-grouped sampler makes them: text lengths
    drawn uniformly from `text`, sorted, cut into groups of `batch`, each right-padded to its longest. BOS first;
    the first third of each text (the prompt) unsupervised; visual tokens [batch, V, D] to splice after BOS."""
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(text[0], text[1] + 1, (count * batch,), generator=g).tolist())
    out = []
    for c in range(count):
        group = torch.tensor(lengths[c * batch:(c + 1) * batch])
        width = int(group.max())
        ids = torch.randint(3, cfg.llm.vocab_size, (batch, width), generator=g)
        ids[:, 0] = 1
        positions = torch.arange(width)[None]
        mask = (positions < group[:, None]).long()
        labels = ids.masked_fill((positions < group[:, None] // 3) | (mask == 0), IGNORE_INDEX)
        visual = torch.randn(batch, cfg.num_visual_tokens, cfg.llm.hidden_size, generator=g) * 0.02
        out.append(tuple(t.to(device) for t in (ids, mask, labels, visual)))
    return out


def real_tokens(micro_batch) -> int:
    ids, mask, _, visual = micro_batch
    return int(mask.sum()) + visual.shape[0] * visual.shape[1]


def llm_step(llm, cfg, mode: str, pack_budget: int = PACK_BUDGET):
    """One training step of `llm` on a micro-batch, in `mode` (one of MODES); gradients dropped after backward."""
    packed, loss = mode.split("+")[0] == "packed", mode.split("+")[1]
    if packed:
        install_for_packing(llm)  # as the trainer does: sdpa runs once per sample, never on a dense mask
    elif backend_of(llm) == "sdpa_packed":
        install(llm, "sdpa")
    prefix = 1 if cfg.llm.has_bos else 0
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=FULL)

    def run(ids, mask, labels, visual):
        with autocast:
            embeds = llm.get_input_embeddings()(ids)
            embeds, mask, labels = splice_visual_tokens(embeds, mask, labels, visual.to(embeds.dtype), prefix)
            if packed:
                p = pack(embeds, mask, labels, pack_budget)
                out = llm_forward(llm, p.embeds, None, p.labels, p.documents, p.position_ids, loss=loss)
            else:
                out = llm_forward(llm, embeds, mask, labels, loss=loss)
        out.loss.backward()
        llm.zero_grad(set_to_none=True)
        return out.loss.detach()

    return run


def available_backends(device: torch.device = DEVICE) -> list[str]:
    report = availability(device, torch.bfloat16 if device.type == "cuda" else None)
    return [name for name in BACKEND_ORDER if report[name][0]]


def _release_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def llm_area(results: ResultsFile, ceilings: dict) -> None:
    presets = ("merv-1b", "merv-7b") if FULL else ("tiny",)
    warmup, iters, count = (2, 6, 3) if FULL else (1, 2, 2)
    auto, auto_why = resolve_attention("auto", DEVICE, torch.bfloat16 if FULL else None)
    models = {}
    for preset in presets:
        cfg = llm_config(preset)
        torch.manual_seed(0)
        with DEVICE:
            llm = build_llm(dataclasses.replace(cfg.llm, attention="sdpa"))
        llm.train()
        batches = stage2_micro_batches(cfg, count)
        models[preset] = (cfg, llm, batches)
    baselines = {}
    for backend in available_backends():
        for preset, (cfg, llm, batches) in models.items():
            install(llm, backend)
            tokens = sum(real_tokens(b) for b in batches) / len(batches)
            for mode in MODES:
                step = llm_step(llm, cfg, mode)
                timing = measure(step, rotate=batches, warmup=warmup, iters=iters)
                timing = dataclasses.replace(timing, peak_mem_bytes=peak_memory(step, *batches[0]))
                if backend == "sdpa" and mode == BASELINE:
                    baselines[preset] = timing
                base = baselines[preset]
                layers = cfg.llm.num_layers
                config = {"preset": preset, "mode": mode, "attention": backend, "auto_attention": auto,
                          "auto_why": auto_why, "batch": BATCH, "text_tokens": list(TEXT_TOKENS),
                          "visual_tokens": cfg.num_visual_tokens, "pack_budget": PACK_BUDGET,
                          "llm_layers": layers if preset != "merv-7b" else
                          f"{layers} of 32 (what fits the area's 300 s budget and memory)",
                          "dtype": "fp32 weights, bf16 autocast" if FULL else "fp32",
                          "real_tokens_per_step": round(tokens)}
                r = row("llm", f"{mode} {backend} {preset}", config, timing, base, reference_name=BASELINE_NAME,
                        tokens_per_s=tokens / (timing.median_ms / 1e3))
                if timing.peak_mem_bytes and base.peak_mem_bytes:
                    r["peak_mem_vs_baseline"] = round(timing.peak_mem_bytes / base.peak_mem_bytes, 3)
                results.append(r)
                _release_memory()


register_area("llm", llm_area, budget_s=300)
