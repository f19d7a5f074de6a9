"""FLOP counts per sample, per module, from the configuration alone (works for meta-device models).

Conventions (the README's MFU section quotes them):
- a matrix product of [m, k] x [k, n] costs 2*m*k*n;
- encoders run forward only, up to the layer taken: patch embedding, per block the attention projections
  (4*C^2 per token), the MLP (2*C*I per token), and attention scores and mixing (4*S^2*C per sequence of S tokens);
  LanguageBind adds its temporal attention: projections 4*C^2 per token and 4*t^2*C per clip sequence;
- the visual path: the E projector products (2*L*C_e*D each) and the fusion keys (negligible, counted);
- the LLM trains: 6 x non-embedding parameters (the LM head included: it is a real product) per token, plus causal
  attention 6*S^2*D per layer (forward 2*S^2*D: half of the full 4*S^2*D, times 3 for forward+backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from merv_fast.config import EncoderConfig, LLMConfig, ModelConfig


def _block_flops(tokens: int, width: int, intermediate: int) -> int:
    return 2 * tokens * (4 * width * width + 2 * width * intermediate)


def encoder_sequences(enc: EncoderConfig) -> tuple[int, int]:
    """(sequences, tokens per sequence) one video makes in the encoder's spatial attention."""
    h, w = enc.grid
    if enc.tubelet > 1:  # ViViT: one sequence over all tubelets plus CLS
        return 1, enc.time_steps * h * w + 1
    prefix = 0 if enc.name == "siglip" else 1 + enc.registers  # CLS + registers + patches (SigLIP has no CLS)
    return enc.frames, h * w + prefix


def encoder_flop_parts(enc: EncoderConfig) -> tuple[int, int]:
    """(matrix products, attention scores and mixing): forward FLOPs of one video through one encoder, up to the
    layer taken. Their sum is `encoder_forward_flops`."""
    c, layers = enc.hidden_size, enc.layers_run
    h, w = enc.grid
    patches = enc.time_steps * h * w
    patch_embed = 2 * patches * (3 * enc.tubelet * enc.patch_size**2) * c
    sequences, seq_len = encoder_sequences(enc)
    tokens = sequences * seq_len
    products = _block_flops(tokens, c, enc.intermediate_size)
    attention = sequences * 4 * seq_len**2 * c
    if enc.clip_frames:  # temporal attention: projections on every token, scores within each clip
        clips = enc.frames // enc.clip_frames
        products += 2 * tokens * 4 * c * c
        attention += clips * seq_len * 4 * enc.clip_frames**2 * c
    return patch_embed + layers * products, layers * attention


def encoder_forward_flops(enc: EncoderConfig) -> int:
    """Forward FLOPs of one video through one encoder, up to the layer taken."""
    return sum(encoder_flop_parts(enc))


def llm_params(llm: LLMConfig) -> tuple[int, int]:
    """(non-embedding parameters including the LM head, input-embedding parameters)."""
    d, kv = llm.hidden_size, llm.hidden_size // llm.num_heads * llm.num_kv_heads
    attn = d * d * 2 + d * kv * 2
    mlp = 3 * d * llm.intermediate_size
    norms = 2 * d
    per_layer = attn + mlp + norms
    vocab = llm.padded_vocab_size
    return llm.num_layers * per_layer + d + vocab * d, vocab * d


def llm_train_flops(llm: LLMConfig, seq_len: int, trained_tokens: int | None = None) -> int:
    """Forward+backward FLOPs of one sequence of `seq_len` tokens."""
    non_embedding, _ = llm_params(llm)
    tokens = seq_len if trained_tokens is None else trained_tokens
    return 6 * non_embedding * tokens + llm.num_layers * 6 * seq_len**2 * llm.hidden_size


def visual_path_flops(cfg: ModelConfig, train: bool = True) -> int:
    d, L = cfg.llm.hidden_size, cfg.visual.num_tokens
    fwd = sum(2 * L * e.hidden_size * d for e in cfg.encoders)
    if len(cfg.encoders) > 1:
        fwd += len(cfg.encoders) * (L * d + 2 * d * cfg.visual.fusion_embed_dim) + 2 * L * d * len(cfg.encoders)
    return 3 * fwd if train else fwd


@dataclass
class SampleFlops:
    encoders: dict[str, int]
    visual: int
    llm: int

    @property
    def total(self) -> int:
        return sum(self.encoders.values()) + self.visual + self.llm


def sample_flops(cfg: ModelConfig, text_tokens: int, visual: bool = True) -> SampleFlops:
    """Training FLOPs of one video sample with `text_tokens` text tokens (visual tokens added when `visual`)."""
    seq = text_tokens + (cfg.visual.num_tokens if visual else 0)
    return SampleFlops(
        encoders={e.name: encoder_forward_flops(e) for e in cfg.encoders} if visual else {},
        visual=visual_path_flops(cfg) if visual else 0,
        llm=llm_train_flops(cfg.llm, seq),
    )


# Dense bf16 tensor-core peaks (FLOP/s) by device name; MFU divides by these. Override with MERV_FAST_PEAK_TFLOPS.
GPU_PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40": 181.0, "A800": 312.0}


def peak_bf16_flops(device_name: str) -> float | None:
    import os

    if os.environ.get("MERV_FAST_PEAK_TFLOPS"):
        return float(os.environ["MERV_FAST_PEAK_TFLOPS"]) * 1e12
    for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
