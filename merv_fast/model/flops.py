"""FLOP counts per sample, per module, from the configuration alone (works for meta-device models).

Conventions (the README's MFU section quotes them):
- a matrix product of [m, k] x [k, n] costs 2*m*k*n;
- encoders run forward only, up to the layer taken: patch embedding, per block the attention projections
  (4*C^2 per token), the MLP (2*C*I per token), and attention scores and mixing (4*S^2*C per sequence of S tokens);
  LanguageBind adds its temporal attention: projections 4*C^2 per token and 4*t^2*C per clip sequence;
- the visual path (`visual_path_flops`): learned poolers, the projector MLPs' products (2*L*C_e*D each for linear),
  the fusion (cross-attention keys; concat_channel's Linear over [P_1 | ... | P_E]);
- the LLM trains: 6 x non-embedding parameters (the LM head included: it is a real product) per token, plus causal
  attention 6*S^2*D per layer (forward 2*S^2*D: half of the full 4*S^2*D, times 3 for forward+backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from merv_fast.arch import PROJECTORS, parse_arch
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
    h, w = enc.patch_grid
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
    head_products = head_attention = 0
    if enc.output == "pooled":  # SigLIP's MAP head: one query over the frame's tokens, then its MLP
        seq = h * w
        head_products = enc.frames * (2 * seq * c * 2 * c + 4 * c * c + 2 * 2 * c * enc.intermediate_size)
        head_attention = enc.frames * 4 * seq * c
    return patch_embed + layers * products + head_products, layers * attention + head_attention


def encoder_forward_flops(enc: EncoderConfig) -> int:
    """Forward FLOPs of one video through one encoder, up to the layer taken."""
    return sum(encoder_flop_parts(enc))


def llm_params(llm: LLMConfig) -> tuple[int, int]:
    """(non-embedding parameters including the LM head, input-embedding parameters). A tied LM head (Qwen2.5-3B) is
    counted in both: it is one tensor, but its product is computed once per token either way."""
    d, kv = llm.hidden_size, llm.hidden_size // llm.num_heads * llm.num_kv_heads
    attn = d * d * 2 + d * kv * 2 + (d + 2 * kv if llm.architecture == "qwen2" else 0)  # Qwen2: q/k/v biases
    mlp = 3 * d * llm.intermediate_size
    norms = 2 * d
    per_layer = attn + mlp + norms
    vocab = llm.padded_vocab_size
    return llm.num_layers * per_layer + d + vocab * d, vocab * d


def llm_train_flops(llm: LLMConfig, seq_len: int, trained_tokens: int | None = None,
                    weight_grads: bool = True) -> int:
    """Forward+backward FLOPs of one sequence of `seq_len` tokens. `weight_grads=False` (a frozen LLM, the align
    stage): the backward still computes the activations' gradients (to reach the visual tokens), not the weights'."""
    non_embedding, _ = llm_params(llm)
    tokens = seq_len if trained_tokens is None else trained_tokens
    return (6 if weight_grads else 4) * non_embedding * tokens + llm.num_layers * 6 * seq_len**2 * llm.hidden_size


def _pooler_flops(kind: str | None, t: int, n: int, c: int, d: int, out: tuple[int, int, int]) -> int:
    """Forward FLOPs of one encoder's learned pooler on one video (t time steps of n tokens of width c)."""
    t_out, h_out, w_out = out
    q = h_out * w_out
    if kind == "attntv":  # per frame: q/kv/out projections, attention, the 4x MLP on the queries
        return t * (2 * q * c * c * 2 + 2 * n * c * 2 * c + 4 * q * n * c + 2 * q * c * 4 * c * 2)
    if kind == "3dconv":
        return 2 * t * n * 27 * c * d
    if kind == "conv":  # per frame: two RegStages of 3 bottlenecks (1x1, depthwise 3x3, 1x1; a 1x1 shortcut first)
        def stage(tokens, cin):
            first = 2 * tokens * (cin * d + 9 * d + d * d + cin * d)
            return first + 2 * (2 * tokens * (2 * d * d + 9 * d))
        return t * (stage(n, c) + stage(q, d))
    return 0


def visual_path_flops(cfg: ModelConfig, train: bool = True) -> int:
    """The visual path's FLOPs per sample, as the release's modules compute them: learned poolers, projector MLPs,
    each encoder's projector output P_e, and the fusion (concat_channel counted as its Linear over [P_1 | ... | P_E],
    although the fused op runs the composed, smaller product)."""
    spec = parse_arch(cfg.visual.arch)
    d, fwd = cfg.llm.hidden_size, 0
    for e in cfg.encoders:
        grid_out = cfg.token_grid(e)
        L = grid_out[0] * grid_out[1] * grid_out[2]
        fwd += _pooler_flops(spec.pooling if spec.learned_pooling else None, e.time_steps, e.tokens_per_step,
                             e.hidden_size, d, grid_out)
        width = d if spec.projector_input_is_llm_width else e.hidden_size
        for w_in, w_out in PROJECTORS[spec.projector]:
            size = {"C": width, "4C": 4 * width, "D": d}
            fwd += 2 * L * size[w_in] * size[w_out]
    n, L = len(cfg.encoders), cfg.tokens_per_encoder
    if cfg.visual.fusion == "cross_attention_avg_lq" and n > 1:
        fwd += n * (L * d + 2 * d * cfg.visual.fusion_embed_dim) + 2 * L * d * n
    elif cfg.visual.fusion in ("concat_channel", "concat_channel_ln"):
        fwd += 2 * L * n * d * d
    return 3 * fwd if train else fwd


@dataclass
class SampleFlops:
    encoders: dict[str, int]
    visual: int
    llm: int

    @property
    def total(self) -> int:
        return sum(self.encoders.values()) + self.visual + self.llm


def sample_flops(cfg: ModelConfig, text_tokens: int, visual: bool = True, llm_trained: bool = True) -> SampleFlops:
    """Training FLOPs of one video sample with `text_tokens` text tokens (visual tokens added when `visual`)."""
    seq = text_tokens + (cfg.num_visual_tokens if visual else 0)
    return SampleFlops(
        encoders={e.name: encoder_forward_flops(e) for e in cfg.encoders} if visual else {},
        visual=visual_path_flops(cfg) if visual else 0,
        llm=llm_train_flops(cfg.llm, seq, weight_grads=llm_trained),
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
