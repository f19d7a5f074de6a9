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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

ENCODER_NAMES = ("languagebind", "dinov2", "vivit", "siglip")
PROMPT_FORMATS = ("llama2-base", "vicuna-v15", "llama3-chat", "qwen25-chat")
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

    resize: str  # "short_side_crop" (resize the short side, center crop) | "squash" (resize both sides)
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = False  # the release resized through PIL (antialiased) for DINOv2, ViViT and SigLIP
    random_flip: bool = False  # LanguageBind flips with p=0.5, at inference too (a release quirk)


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

    @property
    def grid(self) -> tuple[int, int]:
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

    pool_size: tuple[int, int, int] = (16, 8, 8)  # (T', H', W')
    fusion_embed_dim: int = 3072
    frames_sampled: int = 32  # frame indices taken per video; each encoder strides through them

    @property
    def num_tokens(self) -> int:
        t, h, w = self.pool_size
        return t * h * w


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

    @property
    def padded_vocab_size(self) -> int:
        n = self.vocab_size + (1 if self.add_pad_token else 0)
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


# ----------------------------------------------------------------------------------------------- full-size encoders
def languagebind_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="languagebind", image_size=224, patch_size=14, hidden_size=1024, num_heads=16, intermediate_size=4096,
        num_layers=24, layers_run=23, frames=16, clip_frames=8, hidden_act="gelu",
        preprocess=PreprocessSpec("short_side_crop", "bilinear", CLIP_MEAN, CLIP_STD, random_flip=True),
    )


def dinov2_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="dinov2", image_size=224, patch_size=14, hidden_size=1024, num_heads=16, intermediate_size=4096,
        num_layers=24, layers_run=23, frames=16, registers=4, layer_norm_eps=1e-6,
        preprocess=PreprocessSpec("squash", "bicubic", IMAGENET_MEAN, IMAGENET_STD, antialias=True),
    )


def vivit_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="vivit", image_size=224, patch_size=16, hidden_size=768, num_heads=12, intermediate_size=3072,
        num_layers=12, layers_run=12, frames=32, tubelet=2, final_norm=True, layer_norm_eps=1e-6,
        hidden_act="gelu_fast",
        preprocess=PreprocessSpec("squash", "bilinear", HALF, HALF, antialias=True),
    )


def siglip_encoder() -> EncoderConfig:
    return EncoderConfig(
        name="siglip", image_size=224, patch_size=16, hidden_size=768, num_heads=12, intermediate_size=3072,
        num_layers=12, layers_run=11, frames=16, layer_norm_eps=1e-6,
        preprocess=PreprocessSpec("squash", "bicubic", HALF, HALF, antialias=True),
    )


# ----------------------------------------------------------------------------------------------- tiny encoders
def _tiny(enc: EncoderConfig, **dims: Any) -> EncoderConfig:
    return dataclasses.replace(enc, **dims)


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
    return LLMConfig(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
                     max_position_embeddings=4096)


def tiny_llm() -> LLMConfig:
    return LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
                     vocab_size=500, max_position_embeddings=1024, max_text_tokens=256)


def _full_encoders() -> list[EncoderConfig]:
    return [languagebind_encoder(), dinov2_encoder(), vivit_encoder(), siglip_encoder()]


def _single(encoders: list[EncoderConfig]) -> list[EncoderConfig]:
    return [e for e in encoders if e.name == "languagebind"]


TINY_VISUAL = dict(pool_size=(4, 8, 8), fusion_embed_dim=48, frames_sampled=16)

PRESETS = {
    "merv-7b": lambda: ModelConfig("merv-7b", _full_encoders(), llama2_7b()),
    "single-7b": lambda: ModelConfig("single-7b", _single(_full_encoders()), llama2_7b()),
    "merv-1b": lambda: ModelConfig("merv-1b", _full_encoders(), tinyllama_1b()),
    "single-1b": lambda: ModelConfig("single-1b", _single(_full_encoders()), tinyllama_1b()),
    "tiny": lambda: ModelConfig("tiny", tiny_encoders(), tiny_llm(), VisualConfig(**TINY_VISUAL)),
    "single-tiny": lambda: ModelConfig("single-tiny", _single(tiny_encoders()), tiny_llm(),
                                       VisualConfig(**TINY_VISUAL)),
}

# The single-encoder baseline of each MERV preset: the main job runs both.
BASELINE_OF = {"merv-7b": "single-7b", "merv-1b": "single-1b", "tiny": "single-tiny"}


# ----------------------------------------------------------------------------------------------- loading + overrides
def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _set_path(obj: Any, path: list[str], value: Any, full_key: str) -> None:
    """Set a dotted path on nested dataclasses; encoders are addressed by name (`encoders.dinov2.weights`)."""
    head, rest = path[0], path[1:]
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
    by_name = {e.name: e for e in encoders}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"override {key!r}: unknown encoder(s) {missing}; have {list(by_name)}")
    return [by_name[n] for n in names]


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
    loaded = yaml.safe_load(path.read_text()) or {}
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
        if cfg.visual.frames_sampled % enc.frames:
            raise ConfigError(f"encoder {enc.name!r}: takes {enc.frames} frames, which does not divide the "
                              f"{cfg.visual.frames_sampled} frames sampled")
        if enc.frames % enc.tubelet or (enc.clip_frames and enc.frames % enc.clip_frames):
            raise ConfigError(f"encoder {enc.name!r}: frames {enc.frames} not divisible by its tubelet/clip")
        if enc.attention not in ENCODER_ATTENTION:
            raise ConfigError(f"encoder {enc.name!r}: attention={enc.attention!r}; choose one of "
                              f"{list(ENCODER_ATTENTION)}")
    runtime = cfg.encoder_runtime
    if runtime.mode not in ENCODER_MODES:
        raise ConfigError(f"encoders.mode={runtime.mode!r}; choose one of {list(ENCODER_MODES)}")
    for key in ("compile", "prefetch"):
        if not isinstance(getattr(runtime, key), bool):
            raise ConfigError(f"encoders.{key} must be true or false, got {getattr(runtime, key)!r}")
    if cfg.llm.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt_format {cfg.llm.prompt_format!r}; formats are {list(PROMPT_FORMATS)}")
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
