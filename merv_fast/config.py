"""Model configuration: dataclasses, the presets, YAML files and `key=value` overrides.

Every number in the full-size presets comes from ../shared/MERV_SPEC.md (sections 2-5). The tiny presets keep
the structure that matters for correctness (four distinct encoder architectures, LanguageBind's temporal attention
in clips, ViViT's tubelets, 16x16 grids pooled exactly and 14x14 grids pooled with overlapping windows) at widths
that run on a laptop CPU.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merv_fast.arch import ArchError, check_fusion, output_grid, parse_arch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

ENCODER_NAMES = ("languagebind", "dinov2", "vivit", "siglip")
PROMPT_FORMATS = ("llama2-base", "vicuna-v15", "llama3-chat", "qwen25-chat", "llama2-chat")
LLM_ARCHITECTURES = ("llama", "qwen2")  # the transformers class a random-init LLM is built as (merv_fast/model/llm.py)
KERNEL_BACKENDS = ("auto", "triton", "torch")
LLM_ATTENTION = ("auto", "sdpa", "flex", "flash_attn", "xformers")  # merv_fast/model/attention.py
LLM_LOSSES = ("fused", "plain")  # fused: kernels/fused_linear_ce.py; plain: transformers' loss on full logits
LLM_FUSED_LAYER_OPS = ("rms_norm", "swiglu", "rope")  # merv_fast/model/llama_kernels.py
ENCODER_MODES = ("sequential", "streams", "graph")  # merv_fast/runtime/encoders.py
ENCODER_ATTENTION = ("sdpa", "eager")  # eager: the release's, kept for reference benchmarks and tests


class ConfigError(ValueError):
    """A preset, file or override that does not describe a valid model."""


@dataclass
class PreprocessSpec:
    """How one encoder wants its frames: the data pipeline's whole knowledge of an encoder."""

    # "squash" (both sides to the size) | "short_side_crop" (LanguageBind's ShortSideScale + CenterCropVideo) |
    # "resize_crop" (torchvision's Resize(short side) + CenterCrop, the timm/PIL path): kernels/preprocess.py
    resize: str
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = False  # the release resized through PIL (antialiased) for DINOv2, ViViT and SigLIP
    random_flip: bool = False  # LanguageBind flips with p=0.5, at inference too (a release quirk)
    short_side: int = 0  # resize_crop: the short side's length before the crop (0: the image size)
    letterbox: bool = False  # pad to a square with int(mean * 255) first (the release's LetterboxPad)
    strategy: str = "resize-naive"  # the release's image_resize_strategy this spec was made for


@dataclass
class EncoderConfig:
    """One frozen visual encoder. `layers_run` blocks are built and run; the checkpoint may hold more."""

    name: str  # one of ENCODER_NAMES: picks the architecture
    image_size: int
    patch_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int  # blocks in the released checkpoint
    layers_run: int  # blocks up to the layer whose output is taken
    frames: int  # frames this encoder receives per video
    preprocess: PreprocessSpec
    tubelet: int = 1  # temporal patch size (ViViT: 2)
    clip_frames: int = 0  # LanguageBind: frames per temporal-attention clip (checkpoint's num_frames)
    registers: int = 0  # DINOv2 register tokens
    final_norm: bool = False  # the taken output passes the final LayerNorm (ViViT's last_hidden_state)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    weights: str | None = None  # local directory or file; None = random init
    attention: str = "sdpa"  # sdpa | eager (the release ran LanguageBind and ViViT eagerly)
    backbone_id: str = ""  # the release's video_backbone_id (merv/models/materialize.py:31-73)
    output: str = "tokens"  # tokens: patch tokens of block layers_run | pooled: final norm + MAP head, 1 per frame
    checkpoint_image_size: int = 0  # the resolution its weights were trained at (position embeddings resampled
    # from it at load time, as timm does); 0: image_size

    @property
    def grid(self) -> tuple[int, int]:
        if self.output == "pooled":
            return (1, 1)
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def time_steps(self) -> int:
        return self.frames // self.tubelet

    @property
    def tokens_per_step(self) -> int:
        h, w = self.grid
        return h * w


@dataclass
class VisualConfig:
    """Resampling, projection and fusion between the encoders and the LLM (spec sections 3-4)."""

    pool_size: tuple[int, int, int] = (16, 8, 8)  # (T', H', W') of 3davg without frameN (merv_fast/arch.py)
    fusion_embed_dim: int = 3072
    # Frame indices taken per video; each encoder strides through them. None: the release's rule, the most frames
    # any encoder takes (load_video(num_frames=max(num_frames)), merv/models/vidlms/merv.py:800-805): 32 with ViViT,
    # 16 for a 16-frame encoder alone.
    frames_sampled: int | None = None
    arch: str = "no-align+3davg+linear"  # the release's arch_specifier (merv_fast/arch.py)
    fusion: str = "cross_attention_avg_lq"  # the release's feature_fusion (merv_fast/arch.py)
    image_resize_strategy: str = "resize-naive"  # resize-naive | resize-crop | letterbox, applied per encoder
    # Projectors and fusion drawn from their own seeded CPU stream: an int, "release" (the release's
    # `torch.manual_seed(<first encoder's width>)` before it builds them: 1024 for merv-base) or None (the global one).
    init_seed: int | str | None = None


@dataclass
class LLMConfig:
    """A Llama-architecture causal LM, built from these numbers or loaded from `weights` (a local HF directory)."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000  # the tokenizer's vocabulary before the pad token is added
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    add_pad_token: bool = True
    pad_to_multiple_of: int = 64  # embedding rows after adding the pad token (32000 + 1 -> 32064)
    prompt_format: str = "llama2-base"
    has_bos: bool = True  # sequences start with BOS and visual tokens go right after it (Qwen2.5: no BOS)
    max_text_tokens: int = 2048
    weights: str | None = None
    tokenizer: str | None = None  # local tokenizer directory when not `weights` (release checkpoints hold the LLM)
    attention: str = "auto"  # one of LLM_ATTENTION; auto: see merv_fast/model/attention.py
    loss: str = "fused"  # one of LLM_LOSSES
    # Triton RMSNorm / SwiGLU / RoPE in the Llama layers (merv_fast/model/llama_kernels.py): true, false or a list
    # of those ops; off until a GPU benchmark shows they win.
    fused_layer_kernels: bool | list[str] = False
    # --- which LLM: the release's `llm_backbone_id` (LLM_BACKBONES below; `--set llm=vicuna-v15-7b` swaps the whole
    # LLM config) and the architecture details that vary between those backbones.
    backbone: str = "llama2-7b-pure"
    architecture: str = "llama"  # one of LLM_ARCHITECTURES
    tie_word_embeddings: bool = False  # Qwen2.5-3B's LM head is its input embedding
    rope_scaling: dict | None = None  # Llama-3.1's "llama3" frequency scaling
    pad_token: str | None = None  # add_pad_token: the token added (None: "<PAD>"); else an existing token used as pad

    @property
    def padded_vocab_size(self) -> int:
        if not self.add_pad_token:  # the release resizes the table only when it adds the pad token
            return self.vocab_size
        n = self.vocab_size + 1
        m = self.pad_to_multiple_of or 1
        return -(-n // m) * m


@dataclass
class EncoderRuntime:
    """How the frozen encoders run (never what they compute). Set as `encoders.mode=graph`, `encoders.compile=true`,
    `encoders.prefetch=true`: these words are not encoder names, so `encoders.<word>` is unambiguous."""

    mode: str = "sequential"  # sequential | streams | graph (CPU: always sequential)
    compile: bool = False  # torch.compile each encoder
    prefetch: bool = False  # training: the next micro-batch's encoders run on a side stream (CUDA only)


ENCODER_RUNTIME_KEYS = ("mode", "compile", "prefetch")


@dataclass
class ModelConfig:
    name: str
    encoders: list[EncoderConfig]
    llm: LLMConfig
    visual: VisualConfig = field(default_factory=VisualConfig)
    kernels: str = "auto"  # auto | triton | torch (MERV_FAST_KERNELS overrides)
    encoder_runtime: EncoderRuntime = field(default_factory=EncoderRuntime)  # `encoders.mode=...` lands here

    def encoder(self, name: str) -> EncoderConfig:
        for enc in self.encoders:
            if enc.name == name:
                return enc
        raise ConfigError(f"model {self.name!r} has no encoder {name!r}; it has {[e.name for e in self.encoders]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def frames_sampled(self) -> int:
        return self.visual.frames_sampled or max(e.frames for e in self.encoders)

    def token_grid(self, enc: EncoderConfig) -> tuple[int, int, int]:
        """(T', H', W') of encoder `enc`'s tokens after the visual path's resampling."""
        return output_grid(parse_arch(self.visual.arch), tuple(self.visual.pool_size), enc.time_steps, enc.grid)

    @property
    def tokens_per_encoder(self) -> int:
        t, h, w = self.token_grid(self.encoders[0])
        return t * h * w

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens the LLM sees per sample: the sequence concat puts every encoder's tokens one after another."""
        return self.tokens_per_encoder * (len(self.encoders) if self.visual.fusion == "concat" else 1)


# ----------------------------------------------------------------------------------------------- preprocessing
# The release's image_resize_strategy, per encoder (its backbones' transforms: merv/models/backbones/video/
# dinov2_video.py:79-120, vivit.py:53-89, siglip.py:89-130; LanguageBind has one fixed transform and asserts
# resize-naive, languagebind/__init__.py:64). resize-crop and letterbox are the timm / torchvision eval transforms:
# short side to the size (ViViT: its processor's 256) then a center crop; letterbox pads to a square with
# int(mean * 255) first. Each entry maps the image size to the spec.
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def _pil(resize: str, interpolation: str, mean, std, short_side=lambda size: 0, letterbox=False, strategy=""):
    return lambda size: PreprocessSpec(resize, interpolation, mean, std, antialias=True, short_side=short_side(size),
                                       letterbox=letterbox, strategy=strategy)


def _timm_strategies(interpolation: str, mean, std, short_side=lambda size: 0) -> dict:
    return {"resize-naive": _pil("squash", interpolation, mean, std, strategy="resize-naive"),
            "resize-crop": _pil("resize_crop", interpolation, mean, std, short_side, strategy="resize-crop"),
            "letterbox": _pil("resize_crop", interpolation, mean, std, short_side, True, strategy="letterbox")}


PREPROCESS = {
    "languagebind": {"resize-naive": lambda size: PreprocessSpec("short_side_crop", "bilinear", CLIP_MEAN, CLIP_STD,
                                                                 random_flip=True)},
    "dinov2": _timm_strategies("bicubic", IMAGENET_MEAN, IMAGENET_STD),
    "vivit": _timm_strategies("bilinear", HALF, HALF, short_side=lambda size: round(size * 256 / 224)),
    "siglip": _timm_strategies("bicubic", HALF, HALF),
}


def preprocess_spec(encoder: str, strategy: str, image_size: int) -> PreprocessSpec:
    table = PREPROCESS[encoder]
    if strategy not in table:
        why = ("the release's LanguageBind backbone asserts resize-naive (merv/models/backbones/video/languagebind/"
               "__init__.py:64)" if encoder == "languagebind" else f"choose one of {list(table)}")
        raise ConfigError(f"visual.image_resize_strategy={strategy!r} for encoder {encoder!r}: {why}")
    return table[strategy](image_size)


# ----------------------------------------------------------------------------------------------- full-size encoders
def languagebind_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="languagebind", image_size=224, patch_size=14, hidden_size=1024, num_heads=16, intermediate_size=4096,
        num_layers=24, layers_run=23, frames=16, clip_frames=8, hidden_act="gelu",
        preprocess=preprocess_spec("languagebind", "resize-naive", 224), backbone_id="languagebind-video-noclass",
    )


def dinov2_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="dinov2", image_size=224, patch_size=14, hidden_size=1024, num_heads=16, intermediate_size=4096,
        num_layers=24, layers_run=23, frames=16, registers=4, layer_norm_eps=1e-6,
        preprocess=preprocess_spec("dinov2", "resize-naive", 224), backbone_id="dinov2-video-all-tokens",
        checkpoint_image_size=518,
    )


def vivit_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="vivit", image_size=224, patch_size=16, hidden_size=768, num_heads=12, intermediate_size=3072,
        num_layers=12, layers_run=12, frames=32, tubelet=2, final_norm=True, layer_norm_eps=1e-6,
        hidden_act="gelu_fast", preprocess=preprocess_spec("vivit", "resize-naive", 224),
        backbone_id="vivit-google-b-all-no-cls-16frames",
    )


def siglip_encoder(backbone_id: str = "siglip-vit-b16-224px-all-no-cls") -> EncoderConfig:
    """SigLIP as the release's ids build it (merv/models/backbones/video/siglip.py:19-77): every id runs at 224 px
    (position embeddings resampled from the trained resolution); `-all-no-cls` takes block n-2's patch tokens,
    the plain ids take timm's whole forward (final norm + MAP head): one pooled token per frame."""
    wide = "so400m" in backbone_id
    trained = 384 if "384px" in backbone_id else 256 if "256px" in backbone_id else 224
    layers = 27 if wide else 12
    tokens = backbone_id.endswith("-all-no-cls")
    return EncoderConfig(
        name="siglip", image_size=224, patch_size=14 if wide else 16, hidden_size=1152 if wide else 768,
        num_heads=16 if wide else 12, intermediate_size=4304 if wide else 3072, num_layers=layers,
        layers_run=layers - 1 if tokens else layers, frames=16, layer_norm_eps=1e-6,
        preprocess=preprocess_spec("siglip", "resize-naive", 224), backbone_id=backbone_id,
        output="tokens" if tokens else "pooled", checkpoint_image_size=trained,
    )


# The release's video_backbone_ids that build the same architectures from the same local layouts. Its other ids
# are class-token or averaged variants (one token per frame), `-all-tokens` ids that raise NotImplementedError
# (siglip.py:72-76), or Hiera, which this project does not build.
VIDEO_BACKBONES = {
    "languagebind-video-noclass": languagebind_encoder,
    "dinov2-video-all-tokens": dinov2_encoder,
    "vivit-google-b-all-no-cls-16frames": vivit_encoder,
    **{bid: (lambda bid=bid: siglip_encoder(bid)) for bid in (
        "siglip-vit-b16-224px-all-no-cls", "siglip-vit-b16-224px", "siglip-vit-b16-256px", "siglip-vit-b16-384px",
        "siglip-vit-so400m", "siglip-vit-so400m-384px")},
}


# ----------------------------------------------------------------------------------------------- tiny encoders
def _tiny(enc: EncoderConfig, **dims: Any) -> EncoderConfig:
    return dataclasses.replace(enc, checkpoint_image_size=0, **dims)


def tiny_encoders() -> list[EncoderConfig]:
    """Distinct widths per encoder so that a mixed-up column block cannot pass a test by accident."""
    return [
        _tiny(languagebind_encoder(), image_size=112, patch_size=7, hidden_size=64, num_heads=4,
              intermediate_size=128, num_layers=3, layers_run=2, frames=8, clip_frames=4),
        _tiny(dinov2_encoder(), image_size=112, patch_size=7, hidden_size=48, num_heads=4,
              intermediate_size=96, num_layers=3, layers_run=2, frames=8),
        _tiny(vivit_encoder(), image_size=112, patch_size=8, hidden_size=40, num_heads=4,
              intermediate_size=80, num_layers=2, layers_run=2, frames=16),
        _tiny(siglip_encoder(), image_size=112, patch_size=8, hidden_size=32, num_heads=2,
              intermediate_size=64, num_layers=3, layers_run=2, frames=8),
    ]


# ----------------------------------------------------------------------------------------------- LLMs
def llama2_7b() -> LLMConfig:
    return LLMConfig()


def tinyllama_1b() -> LLMConfig:
    return llm_backbone("tinyllama-1.1b")


def tiny_llm() -> LLMConfig:
    return llm_backbone("tiny-tinyllama-1.1b")  # width 64, 2 layers, 4 heads over 2 KV heads


# The release's LLM backbones (merv/models/materialize.py LLM_BACKBONES; sizes from each model's config.json). The
# prompt format is the release's builder for that id (merv/models/backbones/llm/{llama2,llama3,qwen2}.py): note that
# `llama3-8b-chat` uses the Llama-2 `[INST]` builder and `llama3.1-8b-chat` the Llama-3 header one.
_LLAMA2_13B = dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824)
_LLAMA3_8B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                  vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
# Qwen2.5 and Llama-3.1: no pad token added, no embedding resize (the release sets the pad id to 128004).
_QWEN25 = dict(architecture="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
               add_pad_token=False, pad_token="<|endoftext|>", has_bos=False, prompt_format="qwen25-chat")
LLM_BACKBONES: dict[str, dict[str, Any]] = {
    "llama2-7b-pure": {},
    "llama2-13b-pure": _LLAMA2_13B,
    "llama2-7b-chat": {"prompt_format": "llama2-chat"},
    "llama2-13b-chat": {**_LLAMA2_13B, "prompt_format": "llama2-chat"},
    "vicuna-v15-7b": {"prompt_format": "vicuna-v15"},
    "vicuna-v15-13b": {**_LLAMA2_13B, "prompt_format": "vicuna-v15"},
    "llama3-8b-pure": _LLAMA3_8B,
    "llama3-8b-chat": {**_LLAMA3_8B, "prompt_format": "llama2-chat"},
    "llama3.1-8b-chat": {**_LLAMA3_8B, "max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE,
                         "add_pad_token": False, "pad_token": "<|finetune_right_pad_id|>",
                         "prompt_format": "llama3-chat"},
    "qwen2.5-3b-instruct": {**_QWEN25, "hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2,
                            "intermediate_size": 11008, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen2.5-7b-instruct": {**_QWEN25, "hidden_size": 3584, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4,
                            "intermediate_size": 18944, "vocab_size": 152064},
    # Not a release backbone: the LLM of our merv-1b presets (TinyLlama-1.1B: the Llama-2 tokenizer and format).
    "tinyllama-1.1b": {"hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
                       "intermediate_size": 5632},
}
# `tiny-<backbone>`: that backbone's architecture, prompt format, pad and BOS handling at test width (grouped-query
# attention kept where the backbone has it); the vocabulary is the in-process test tokenizer's (merv_fast/testing.py).
_TINY_LLM_DIMS = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176, vocab_size=500,
                      max_position_embeddings=1024, max_text_tokens=256)


def llm_backbone(name: str) -> LLMConfig:
    """The LLM config of one of the release's backbone ids (LLM_BACKBONES), or its `tiny-` test-width variant."""
    base = name.removeprefix("tiny-")
    if base not in LLM_BACKBONES:
        raise ConfigError(f"unknown LLM backbone {name!r}; backbones are {list(LLM_BACKBONES)} (or tiny-<backbone>)")
    cfg = LLMConfig(backbone=name, **LLM_BACKBONES[base])
    if name.startswith("tiny-"):
        gqa = cfg.num_kv_heads < cfg.num_heads
        cfg = dataclasses.replace(cfg, **_TINY_LLM_DIMS, num_kv_heads=2 if gqa else 4)
        if cfg.rope_scaling:  # keep the scaling active at the tiny context length
            cfg.rope_scaling = {**cfg.rope_scaling, "original_max_position_embeddings": 64}
    return cfg


def _full_encoders() -> list[EncoderConfig]:
    return [languagebind_encoder(), dinov2_encoder(), vivit_encoder(), siglip_encoder()]


TINY_VISUAL = dict(pool_size=(4, 8, 8), fusion_embed_dim=48)

# The release's registered model ids (merv/conf/models.py:99-206): encoders and architecture specifier (all use
# cross_attention_avg_lq and resize-naive). merv-full differs from merv-base only in needing its align stage.
RELEASE_MODELS = {
    "merv-base": (ENCODER_NAMES, "no-align+3davg+linear"),
    "merv-full": (ENCODER_NAMES, "3davg+linear"),
    **{f"{name}-single": ((name,), "no-align+3davg+linear") for name in ENCODER_NAMES},
}
# Sizes compose with every id: `<id>` full size (LLaMA-2 7B), `<id>-1b` (TinyLlama widths), `<id>-tiny` (CPU, tests).
SIZES = {
    "": lambda: (_full_encoders(), llama2_7b(), {}),
    "-1b": lambda: (_full_encoders(), tinyllama_1b(), {}),
    "-tiny": lambda: (tiny_encoders(), tiny_llm(), TINY_VISUAL),
}
# Earlier names, kept: merv-7b is merv-base, single-* the LanguageBind single-encoder model.
PRESET_ALIASES = {"merv-7b": "merv-base", "merv-1b": "merv-base-1b", "tiny": "merv-base-tiny",
                  "single-7b": "languagebind-single", "single-1b": "languagebind-single-1b",
                  "single-tiny": "languagebind-single-tiny"}


def _release_preset(name: str, model_id: str, size: str) -> ModelConfig:
    names, arch = RELEASE_MODELS[model_id]
    encoders, llm, visual = SIZES[size]()
    return ModelConfig(name, [e for e in encoders if e.name in names], llm, VisualConfig(**visual, arch=arch))


PRESETS = {f"{model_id}{size}": (lambda n=f"{model_id}{size}", m=model_id, s=size: _release_preset(n, m, s))
           for model_id in RELEASE_MODELS for size in SIZES}
PRESETS.update({alias: (lambda a=alias, t=target: dataclasses.replace(PRESETS[t](), name=a))
                for alias, target in PRESET_ALIASES.items()})

# The single-encoder baseline of each MERV preset: the main job runs both.
BASELINE_OF = {"merv-7b": "single-7b", "merv-1b": "single-1b", "tiny": "single-tiny",
               **{f"{model_id}{size}": f"languagebind-single{size}" for model_id in RELEASE_MODELS
                  if model_id != "languagebind-single" for size in SIZES}}


# ----------------------------------------------------------------------------------------------- loading + overrides
def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    _apply_resize_strategy(cfg)
    validate(cfg)
    return cfg


def _apply_resize_strategy(cfg: ModelConfig) -> None:
    """Give each encoder the preprocessing of `visual.image_resize_strategy`, unless its spec was made for it
    (then any field set on it by hand stays)."""
    for enc in cfg.encoders:
        if enc.preprocess.strategy != cfg.visual.image_resize_strategy:
            if cfg.visual.image_resize_strategy not in RESIZE_STRATEGIES:
                raise ConfigError(f"visual.image_resize_strategy={cfg.visual.image_resize_strategy!r}; choose one of "
                                  f"{list(RESIZE_STRATEGIES)}")
            enc.preprocess = preprocess_spec(enc.name, cfg.visual.image_resize_strategy, enc.image_size)


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _set_path(obj: Any, path: list[str], value: Any, full_key: str) -> None:
    """Set a dotted path on nested dataclasses; encoders are addressed by name (`encoders.dinov2.weights`)."""
    head, rest = path[0], path[1:]
    if isinstance(obj, ModelConfig) and head == "llm" and not rest and isinstance(value, str):
        obj.llm = llm_backbone(value)  # `llm=vicuna-v15-7b`: the whole LLM config of that backbone
        return
    if isinstance(obj, ModelConfig) and head == "encoders" and rest and rest[0] in ENCODER_RUNTIME_KEYS:
        return _set_path(obj.encoder_runtime, rest, value, full_key)  # `encoders.mode`, not an encoder named "mode"
    if isinstance(obj, list):  # the encoder list
        target = next((e for e in obj if getattr(e, "name", None) == head), None)
        if target is None:
            raise ConfigError(f"override {full_key!r}: no encoder {head!r} (have {[e.name for e in obj]})")
        if not rest:
            raise ConfigError(f"override {full_key!r}: name a field of encoder {head!r}")
        return _set_path(target, rest, value, full_key)
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        raise ConfigError(f"override {full_key!r}: unknown key {head!r}; known here: {fields}")
    current = getattr(obj, head)
    if rest:
        return _set_path(current, rest, value, full_key)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        for k, v in value.items():
            _set_path(current, [k], v, f"{full_key}.{k}")
        return
    if head == "encoders" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = _select_encoders(current, value, full_key)  # keep a subset, in the order given
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(obj, head, value)


def _select_encoders(encoders: list[EncoderConfig], names: list[str], key: str) -> list[EncoderConfig]:
    """Keep a subset of the encoders in the order given; a release backbone id (VIDEO_BACKBONES) brings that
    encoder at full size in its place."""
    by_name = {e.name: e for e in encoders}
    missing = [n for n in names if n not in by_name and n not in VIDEO_BACKBONES]
    if missing:
        raise ConfigError(f"override {key!r}: unknown encoder(s) {missing}; have {list(by_name)}, or a release "
                          f"backbone id of {sorted(VIDEO_BACKBONES)}")
    return [by_name[n] if n in by_name else VIDEO_BACKBONES[n]() for n in names]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "preprocess":
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Return a copy of `cfg` with dotted-key overrides applied (`llm.num_layers`, `encoders.dinov2.weights`).

    `__` may stand for `.` so that Python keyword arguments can carry overrides (`llm__num_layers=4`).
    """
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        dotted = key.replace("__", ".")
        _set_path(cfg, dotted.split("."), value, dotted)
    _apply_resize_strategy(cfg)
    validate(cfg)
    return cfg


def parse_cli_overrides(items: list[str]) -> dict[str, Any]:
    """`["llm.num_layers=4", "visual.pool_size=[8,8,8]"]` -> dict, values parsed as YAML scalars/lists."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        out[key.strip()] = _parse_value(text)
    return out


def read_yaml_mapping(config_file: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; a missing file or another YAML type is a ConfigError naming it."""
    import yaml

    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Preset, then the YAML file's keys (it may name its own `preset`), then the overrides, in that order."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        loaded = read_yaml_mapping(config_file)
        preset = loaded.pop("preset", None) or preset
        file_values = _flatten(loaded)
    cfg = get_preset(preset or "tiny")
    try:
        cfg = apply_overrides(cfg, file_values)
    except ConfigError as err:
        raise ConfigError(f"config file {str(config_file)!r}: {err}") from None
    return apply_overrides(cfg, overrides or {})


def model_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """The inverse of `ModelConfig.to_dict()` (what runs and exports record), validated; an unknown key is a
    ConfigError naming `source` and the key. Keys a later version added are left at their defaults."""
    def build(cls, values: Any, where: str):
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: {where}: unknown key(s) {unknown}; known: {sorted(known)}")
        out = {}
        for key, value in values.items():
            default = known[key].default
            out[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        return cls(**out)

    data = dict(data)
    encoders = []
    for i, enc in enumerate(data.pop("encoders", [])):
        enc = dict(enc)
        pre = enc.pop("preprocess", {})
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}
        encoders.append(build(EncoderConfig, {**enc, "preprocess": build(PreprocessSpec, pre, f"encoders[{i}]")},
                              f"encoders[{i}]"))
    parts = {"llm": LLMConfig, "visual": VisualConfig, "encoder_runtime": EncoderRuntime}
    for key, cls in parts.items():
        if key in data:
            data[key] = build(cls, data[key], key)
    cfg = build(ModelConfig, {**data, "encoders": encoders}, "model")
    validate(cfg)
    return cfg


def validate(cfg: ModelConfig) -> None:
    if not cfg.encoders:
        raise ConfigError(f"model {cfg.name!r} has no encoders")
    seen = set()
    for enc in cfg.encoders:
        if enc.name not in ENCODER_NAMES:
            raise ConfigError(f"unknown encoder {enc.name!r}; encoders are {list(ENCODER_NAMES)}")
        if enc.name in seen:
            raise ConfigError(f"encoder {enc.name!r} appears twice")
        seen.add(enc.name)
        if not 1 <= enc.layers_run <= enc.num_layers:
            raise ConfigError(f"encoder {enc.name!r}: layers_run={enc.layers_run} outside 1..{enc.num_layers}")
        if enc.hidden_size % enc.num_heads:
            raise ConfigError(f"encoder {enc.name!r}: hidden_size {enc.hidden_size} not divisible by heads")
        if cfg.frames_sampled % enc.frames:
            raise ConfigError(f"encoder {enc.name!r}: takes {enc.frames} frames, which does not divide the "
                              f"{cfg.frames_sampled} frames sampled")
        if enc.output not in ("tokens", "pooled") or (enc.output == "pooled" and enc.name != "siglip"):
            raise ConfigError(f"encoder {enc.name!r}: output={enc.output!r}; 'tokens', or 'pooled' for SigLIP's ids "
                              f"without -all-no-cls")
        if enc.frames % enc.tubelet or (enc.clip_frames and enc.frames % enc.clip_frames):
            raise ConfigError(f"encoder {enc.name!r}: frames {enc.frames} not divisible by its tubelet/clip")
        if enc.attention not in ENCODER_ATTENTION:
            raise ConfigError(f"encoder {enc.name!r}: attention={enc.attention!r}; choose one of "
                              f"{list(ENCODER_ATTENTION)}")
    _validate_visual(cfg)
    runtime = cfg.encoder_runtime
    if runtime.mode not in ENCODER_MODES:
        raise ConfigError(f"encoders.mode={runtime.mode!r}; choose one of {list(ENCODER_MODES)}")
    for key in ("compile", "prefetch"):
        if not isinstance(getattr(runtime, key), bool):
            raise ConfigError(f"encoders.{key} must be true or false, got {getattr(runtime, key)!r}")
    if cfg.llm.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt_format {cfg.llm.prompt_format!r}; formats are {list(PROMPT_FORMATS)}")
    seed = cfg.visual.init_seed
    if not (seed is None or seed == "release" or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0)):
        raise ConfigError(f"visual.init_seed={seed!r}; use a non-negative integer, \"release\" or null")
    llm = cfg.llm
    if llm.backbone.removeprefix("tiny-") not in LLM_BACKBONES:
        raise ConfigError(f"llm.backbone={llm.backbone!r}; backbones are {list(LLM_BACKBONES)}")
    if llm.architecture not in LLM_ARCHITECTURES:
        raise ConfigError(f"llm.architecture={llm.architecture!r}; choose one of {list(LLM_ARCHITECTURES)}")
    if llm.rope_scaling is not None and not isinstance(llm.rope_scaling, dict):
        raise ConfigError(f"llm.rope_scaling must be a mapping or null, got {llm.rope_scaling!r}")
    for key in ("has_bos", "add_pad_token", "tie_word_embeddings"):
        if not isinstance(getattr(llm, key), bool):
            raise ConfigError(f"llm.{key} must be true or false, got {getattr(llm, key)!r}")
    if cfg.llm.attention not in LLM_ATTENTION:
        raise ConfigError(f"llm.attention={cfg.llm.attention!r}; choose one of {list(LLM_ATTENTION)}")
    if cfg.llm.loss not in LLM_LOSSES:
        raise ConfigError(f"llm.loss={cfg.llm.loss!r}; choose one of {list(LLM_LOSSES)}")
    fused = cfg.llm.fused_layer_kernels
    if not isinstance(fused, bool) and not (isinstance(fused, (list, tuple))
                                            and all(op in LLM_FUSED_LAYER_OPS for op in fused)):
        raise ConfigError(f"llm.fused_layer_kernels={fused!r}; use true, false or a list of "
                          f"{list(LLM_FUSED_LAYER_OPS)}")
    if cfg.kernels not in KERNEL_BACKENDS:
        raise ConfigError(f"kernels={cfg.kernels!r}; choose one of {list(KERNEL_BACKENDS)}")
    if cfg.llm.hidden_size % cfg.llm.num_heads or cfg.llm.num_heads % cfg.llm.num_kv_heads:
        raise ConfigError("llm: hidden_size must divide by num_heads and num_heads by num_kv_heads")


def _validate_visual(cfg: ModelConfig) -> None:
    """The architecture specifier and fusion against the encoders, as the release's constructor checks them
    (merv/models/vidlms/merv.py:174-207): every encoder must yield the same number of tokens."""
    try:
        spec = parse_arch(cfg.visual.arch)
        check_fusion(cfg.visual.fusion)
        grids = [cfg.token_grid(e) for e in cfg.encoders]
    except ArchError as err:
        raise ConfigError(str(err)) from None
    if len(cfg.encoders) > 1:
        if spec.pooling is None:
            raise ConfigError(f"visual.arch={cfg.visual.arch!r}: without pooling the release runs one encoder only "
                              f"(merv/models/vidlms/merv.py:186-193); this model has {len(cfg.encoders)}")
        if len({t * h * w for t, h, w in grids}) > 1:
            raise ConfigError(f"visual.arch={cfg.visual.arch!r}: the encoders yield different token grids "
                              f"{dict(zip([e.name for e in cfg.encoders], grids))}; the release asserts they agree "
                              f"(merv/models/vidlms/merv.py:176-184)")
    if spec.projector == "none" and not spec.projector_input_is_llm_width:
        wrong = [e.name for e in cfg.encoders if e.hidden_size != cfg.llm.hidden_size]
        if wrong:
            raise ConfigError(f"visual.arch={cfg.visual.arch!r}: the 'none' projector passes encoder features on "
                              f"as they are, so {wrong} must be {cfg.llm.hidden_size} wide (the LLM's width)")
    if spec.pooling == "attntv":
        for e in cfg.encoders:
            if e.hidden_size % 8:
                raise ConfigError(f"visual.arch={cfg.visual.arch!r}: attntv's 8-head pooler needs widths that divide "
                                  f"by 8 (the release asserts it); {e.name} is {e.hidden_size}")
