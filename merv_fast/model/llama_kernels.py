"""Optional fused Llama-layer kernels (`llm.fused_layer_kernels`): RMSNorm, the SwiGLU activation and RoPE of a
transformers LlamaForCausalLM run through merv_fast.kernels (rms_norm.py, swiglu.py, rope.py).

`apply_fused_llama_kernels` changes only the class of each LlamaRMSNorm / LlamaMLP / LlamaAttention module to a
subclass whose forward calls the fused op: parameters, buffers and state_dict keys stay as they are, so FSDP2, the
checkpoints and the release export see the same model. Each op dispatches as kernels/dispatch.py decides, so on CPU
tensors (without TRITON_INTERPRET) the swapped modules run the torch references, which are the transformers modules'
own computations. Off by default: kept on only where a GPU benchmark (`merv-fast gpu-suite --only llama-kernels`,
bench/bench_llama_kernels.py) shows an op wins; `true` swaps all three, a list (`[rms_norm, swiglu]`) some.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, eager_attention_forward

from merv_fast.config import LLM_FUSED_LAYER_OPS as FUSED_OPS
from merv_fast.kernels.rms_norm import rms_norm
from merv_fast.kernels.rope import apply_rotary
from merv_fast.kernels.swiglu import swiglu

CONFIG_KEY = "llm.fused_layer_kernels"


class FusedLlamaRMSNorm(LlamaRMSNorm):
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedLlamaMLP(LlamaMLP):
    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")  # the KV cache's name across transformers versions


class FusedRopeLlamaAttention(LlamaAttention):
    """LlamaAttention.forward with the rotary embedding fused, the attention itself still whatever
    `config._attn_implementation` names (merv_fast/model/attention.py's backends included, keyword arguments passed
    through). With a KV cache (generation) the module's own forward runs, so the cache handling stays transformers'.
    tests/model/test_llama_kernels.py holds this copy of the forward to the original: bit-identical on CPU."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        if any(kwargs.get(key) is not None for key in _CACHE_KEYS):
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _swiglu_mlp(module: nn.Module) -> bool:
    return getattr(module.config, "hidden_act", None) in ("silu", "swish")


# op -> (transformers class, fused subclass, whether this instance computes what the fused forward assumes)
_SWAPS = {
    "rms_norm": (LlamaRMSNorm, FusedLlamaRMSNorm, lambda m: True),
    "swiglu": (LlamaMLP, FusedLlamaMLP, _swiglu_mlp),
    "rope": (LlamaAttention, FusedRopeLlamaAttention, lambda m: True),
}


def fused_ops(setting) -> tuple[str, ...]:
    """The ops a `llm.fused_layer_kernels` value turns on: false -> none, true -> all, a list -> those."""
    if isinstance(setting, bool):
        return FUSED_OPS if setting else ()
    if isinstance(setting, (list, tuple)) and all(isinstance(op, str) for op in setting):
        unknown = [op for op in setting if op not in FUSED_OPS]
        if unknown:
            raise ValueError(f"{CONFIG_KEY}: unknown op(s) {unknown}; choose from {list(FUSED_OPS)}")
        return tuple(setting)
    raise ValueError(f"{CONFIG_KEY} must be true, false or a list of {list(FUSED_OPS)}, got {setting!r}")


def apply_fused_llama_kernels(llm: nn.Module, setting=True) -> dict[str, int]:
    """Swap the fused forwards into `llm`'s Llama modules (in place); returns how many modules each op took.

    Only modules of exactly transformers' Llama classes are swapped (a second call changes nothing). A model with
    none of them (a Qwen2 checkpoint, say) is an error: the setting would silently do nothing.
    """
    ops = fused_ops(setting)
    counts = dict.fromkeys(ops, 0)
    for module in llm.modules():
        for op in ops:
            original, fused, applies = _SWAPS[op]
            if type(module) is original and applies(module):
                module.__class__ = fused
                counts[op] += 1
            elif type(module) is fused:
                counts[op] += 1
    missing = [op for op, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"{CONFIG_KEY}: {type(llm).__name__} has no module the fused {missing} can replace (they "
                         f"need transformers' LlamaRMSNorm / LlamaMLP with silu / LlamaAttention)")
    return counts
