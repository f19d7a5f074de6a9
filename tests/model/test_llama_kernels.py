"""`llm.fused_layer_kernels`: which modules it swaps, that names and results stay the same on CPU (where the swapped
modules run the torch references), and its errors. The Triton kernels themselves are tested in the interpreter
(tests/kernels/triton/test_llama_kernels_triton.py)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

import merv_fast
from merv_fast.config import ConfigError, tiny_llm
from merv_fast.model.llama_kernels import FusedLlamaMLP, FusedLlamaRMSNorm, apply_fused_llama_kernels
from merv_fast.model.llm import build_llm


def test_build_model_swaps_modules_without_changing_names_or_results():
    torch.manual_seed(0)
    plain = merv_fast.build_model("tiny")
    fused = merv_fast.build_model("tiny", **{"llm.fused_layer_kernels": True})
    fused.load_state_dict(plain.state_dict())
    assert list(fused.state_dict()) == list(plain.state_dict())
    layer = fused.llm.model.layers[0]
    assert type(layer.input_layernorm) is FusedLlamaRMSNorm and type(layer.mlp) is FusedLlamaMLP
    assert type(plain.llm.model.layers[0].mlp).__name__ == "LlamaMLP"

    ids = torch.randint(3, 500, (2, 19))
    positions = torch.cat([torch.arange(12), torch.arange(7)])[None].expand(2, -1)  # two packed samples per row
    losses = []
    for model in (plain, fused):
        out = model.llm(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.equal(losses[1], losses[0])  # the CPU path is the transformers modules' own computation
    grads = dict(plain.llm.named_parameters())
    for name, p in fused.llm.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_generation_with_a_kv_cache_runs_the_modules_own_attention(monkeypatch):
    torch.manual_seed(0)
    plain = build_llm(tiny_llm()).eval()
    fused = build_llm(tiny_llm()).eval()
    fused.load_state_dict(plain.state_dict())
    apply_fused_llama_kernels(fused)
    ids = torch.randint(3, 500, (1, 6))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    want = plain.generate(ids, **kwargs)
    calls = []
    original = LlamaAttention.forward
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert torch.equal(fused.generate(ids, **kwargs), want)
    assert len(calls) == 2 * 4  # every layer, every step: the fused forward handed the cached calls over


def test_a_list_turns_on_only_those_ops():
    llm = build_llm(tiny_llm())
    assert apply_fused_llama_kernels(llm, ["rms_norm"]) == {"rms_norm": 5}
    assert type(llm.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert apply_fused_llama_kernels(llm, ["rms_norm", "swiglu"]) == {"rms_norm": 5, "swiglu": 2}  # idempotent


def test_bad_settings_and_non_llama_models_are_refused():
    with pytest.raises(ConfigError, match="llm.fused_layer_kernels"):
        merv_fast.build_model("tiny", device="meta", **{"llm.fused_layer_kernels": ["layernorm"]})
    with pytest.raises(ConfigError, match="llm.fused_layer_kernels"):
        merv_fast.build_model("tiny", device="meta", **{"llm.fused_layer_kernels": "yes"})
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(ValueError, match="llm.fused_layer_kernels.*Qwen2ForCausalLM"):
        apply_fused_llama_kernels(qwen)
