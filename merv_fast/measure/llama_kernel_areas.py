"""GPU-suite area `llama-kernels`: the optional fused Llama-layer ops (kernels/rms_norm.py, swiglu.py, rope.py) against
their torch references (transformers' computations), forward and forward+backward, at merv-1b and merv-7b LLM shapes
in bf16 with 8 x 1600 token rows (a stage-2 batch: 1024 visual tokens plus text).

The ops are memory-bound, so each row carries the bytes the fused kernels must move (every input read once, every
output written once) and its share of the run's copy-bandwidth ceiling (`share_of_ceiling`). `llm.fused_layer_kernels`
stays off for an op until these rows show it winning. `bench/bench_llama_kernels.py` times the same cases under
pytest-benchmark. On a CPU run (`gpu-suite --allow-cpu`, the tests) the same code runs at the tiny LLM's shapes,
where "fused" is whatever `resolve_backend` picks (the torch reference, without TRITON_INTERPRET).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from merv_fast.config import LLMConfig, get_preset
from merv_fast.kernels.dispatch import resolve_backend
from merv_fast.kernels.rms_norm import rms_norm, rms_norm_reference
from merv_fast.kernels.rope import apply_rotary, apply_rotary_reference
from merv_fast.kernels.swiglu import swiglu, swiglu_reference
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda"
# (presets, batch, tokens per row, dtype): full size on a GPU, the tiny LLM elsewhere.
SHAPES = (("merv-1b", "merv-7b"), 8, 1600, torch.bfloat16) if FULL else (("tiny",), 2, 24, torch.float32)


@dataclass
class OpCase:
    """One op at one shape: both implementations take the same `(inputs, output grads)` sets, rotated."""

    op: str
    fused: Callable[..., tuple[torch.Tensor, ...]]
    reference: Callable[..., tuple[torch.Tensor, ...]]
    reference_name: str
    sets: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    config: dict
    bytes_forward: int  # what the fused forward must read and write
    bytes_backward: int  # what the fused backward must read and write


def timed(fn: Callable[..., tuple[torch.Tensor, ...]], backward: bool) -> Callable:
    """fn on one set; with backward also the input gradients, by autograd.grad (no .grad accumulation to time)."""
    def run(inputs, grads):
        outputs = fn(*inputs)
        if backward:
            torch.autograd.grad(outputs, inputs, grads)
    return run


def op_cases(llm: LLMConfig, batch: int, seq: int, dtype: torch.dtype, copies: int = 2) -> list[OpCase]:
    """RMSNorm over the hidden size, SwiGLU over the MLP width and RoPE of q/k, at this LLM's sizes."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def draw(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(grad)

    rows, hidden, width = batch * seq, llm.hidden_size, llm.intermediate_size
    heads, kv_heads, head_dim = llm.num_heads, llm.num_kv_heads, llm.hidden_size // llm.num_heads
    element = torch.finfo(dtype).bits // 8
    eps = llm.rms_norm_eps
    shape = {"batch": batch, "tokens_per_row": seq, "dtype": str(dtype).replace("torch.", "")}

    norm_sets = [((draw(batch, seq, hidden), draw(hidden)), (draw(batch, seq, hidden, grad=False),))
                 for _ in range(copies)]
    mlp_sets = [((draw(batch, seq, width), draw(batch, seq, width)), (draw(batch, seq, width, grad=False),))
                for _ in range(copies)]
    cos, sin = _rotary_tables(llm, batch, seq, dtype)
    rope_sets = [((draw(batch, seq, heads, head_dim), draw(batch, seq, kv_heads, head_dim)),
                  (draw(batch, heads, seq, head_dim, grad=False), draw(batch, kv_heads, seq, head_dim, grad=False)))
                 for _ in range(copies)]

    def attention_layout(rotate):  # q/k as LlamaAttention hands them over: [B, S, H, D] viewed as [B, H, S, D]
        return lambda q, k: rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    x, weight = norm_sets[0][0]
    gate = mlp_sets[0][0][0]
    q, k = rope_sets[0][0]
    qk = (heads + kv_heads) * rows * head_dim * element
    tables = 2 * rows * head_dim * element
    return [
        OpCase("rms_norm", lambda x, w: (rms_norm(x, w, eps),), lambda x, w: (rms_norm_reference(x, w, eps),),
               "transformers LlamaRMSNorm", norm_sets,
               {**shape, "width": hidden, "fused_backend": resolve_backend(x, weight)},
               2 * rows * hidden * element + 4 * rows, 3 * rows * hidden * element + 4 * rows),
        OpCase("swiglu", lambda g, u: (swiglu(g, u),), lambda g, u: (swiglu_reference(g, u),),
               "transformers LlamaMLP act: silu(gate) * up", mlp_sets,
               {**shape, "width": width, "fused_backend": resolve_backend(gate)},
               3 * rows * width * element, 5 * rows * width * element),
        OpCase("rope", attention_layout(apply_rotary), attention_layout(apply_rotary_reference),
               "transformers apply_rotary_pos_emb", rope_sets,
               {**shape, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                "fused_backend": resolve_backend(q, k, cos, sin)},
               2 * qk + tables, 2 * qk + tables),
    ]


def _rotary_tables(llm: LLMConfig, batch: int, seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as LlamaRotaryEmbedding makes them, for rows holding two packed samples (positions restart)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from merv_fast.model.llm import llama_config

    first = seq * 2 // 3
    positions = torch.cat([torch.arange(first), torch.arange(seq - first)]).to(DEVICE)[None].expand(batch, -1)
    anchor = torch.empty(0, device=DEVICE, dtype=dtype)  # only its dtype and device are read
    return LlamaRotaryEmbedding(llama_config(llm)).to(DEVICE)(anchor, positions)


def llama_kernels_area(results: ResultsFile, ceilings: dict) -> None:
    presets, batch, seq, dtype = SHAPES
    for preset in presets:
        cases = op_cases(get_preset(preset).llm, batch, seq, dtype)
        for case in cases:
            for backward in (False, True):
                label = "fwd+bwd" if backward else "fwd"
                moved = case.bytes_forward + (case.bytes_backward if backward else 0)
                results.append(row("llama-kernels", f"{case.op} {label} {preset}", {"preset": preset, **case.config},
                                   measure(timed(case.fused, backward), rotate=case.sets),
                                   measure(timed(case.reference, backward), rotate=case.sets),
                                   reference_name=case.reference_name, bytes=moved, ceilings=ceilings))
        del cases
        if FULL:
            torch.cuda.empty_cache()  # the 7b inputs need the room the 1b ones held


register_area("llama-kernels", llama_kernels_area, budget_s=180)
