"""pytest-benchmark suite: the LLM's training step on spliced inputs, forward with the loss + backward.

Inputs as the model builds them: text embeddings with the visual tokens spliced in after BOS (splice_visual_tokens),
attention mask and labels to match. Attention backend: SDPA (the model's); packing and other losses join the
parameters as the LLM grows them.
CPU/CI: the tiny LLM in fp32, run once as tests (`--benchmark-disable`). GPU: merv-1b's LLM (TinyLlama 1.1B), fp32
master weights under bf16 autocast as the trainer runs it, B=1 and 8 with 128 text tokens + the preset's visual
tokens; the figure of record is the CUDA-event median in `extra_info["cuda_median_ms"]`, inputs rotated.
Measure: `python -m pytest bench/bench_llm.py --benchmark-enable --benchmark-json out.json`.
"""


import pytest
import torch

from merv_fast.config import get_preset
from merv_fast.measure.pytest_bench import record
from merv_fast.model.llm import build_llm, splice_visual_tokens

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = [("merv-1b", b) for b in (1, 8)] if CUDA else [("tiny", 2)]
TEXT_TOKENS = 128 if CUDA else 16


def spliced_inputs(cfg, llm, batch, copies=2):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dim, visual_tokens = cfg.llm.hidden_size, cfg.visual.num_tokens
    out = []
    for _ in range(copies):
        ids = torch.randint(3, cfg.llm.vocab_size, (batch, TEXT_TOKENS), device=DEVICE, generator=g)
        ids[:, 0] = 1
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, : TEXT_TOKENS // 2] = -100
        visual = torch.randn(batch, visual_tokens, dim, device=DEVICE, generator=g) * 0.02
        out.append((ids, mask, labels, visual))
    return out


@pytest.mark.parametrize("preset,batch", SIZES)
@pytest.mark.parametrize("attention", ["sdpa"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_llm_step(benchmark, preset, batch, attention, backward):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    with DEVICE:
        llm = build_llm(cfg.llm)
    assert llm.config._attn_implementation == attention
    llm.train()
    prefix = 1 if cfg.llm.has_bos else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)

    def run(ids, mask, labels, visual):
        with torch.set_grad_enabled(backward), autocast:
            embeds = llm.get_input_embeddings()(ids)
            embeds, m, lab = splice_visual_tokens(embeds, mask, labels, visual.to(embeds.dtype), prefix_length=prefix)
            loss = llm(inputs_embeds=embeds, attention_mask=m, labels=lab).loss
        if backward:
            loss.backward()
            llm.zero_grad(set_to_none=True)
        return loss

    rotate = spliced_inputs(cfg, llm, batch)
    assert torch.isfinite(run(*rotate[0]))
    benchmark.extra_info.update(tokens=batch * (TEXT_TOKENS + cfg.visual.num_tokens))
    record(benchmark, run, rotate, warmup=2, iters=10)
