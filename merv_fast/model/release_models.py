"""The release's models as our presets: from the `model` section of a release run directory's `config.json` to the
preset (and overrides) that computes that model, and back, for `export=release`.

A release run directory (what `load_vid` reads, merv/models/load_vid.py:53-79, and what its hub serves per model id)
holds `config.json` and `checkpoints/latest-checkpoint.pt`. The `model` section's fields are the release's
`ModelConfig` (merv/conf/models.py:26-43): model_id, arch_specifier, feature_fusion, video_backbone_ids,
llm_backbone_id, image_resize_strategy, llm_max_length, num_frames, projector_token_length, visual_feature_length.
A field the section leaves out takes `MERV_Base`'s value, as `load_vid` builds `MERV_Base(**section)`
(load_vid.py:79; models.py:100-119); `num_frames` pairs with the encoders as the release's `zip` does
(materialize.py:115). The model id is only a name there: the fields make the model.

So a section builds: the preset of its model id (one of the release's registered ids, config.RELEASE_MODELS; any
other id starts from merv-base) with the section's encoders, LLM, architecture specifier, fusion and resize strategy
as overrides (each validated by the config: an unsupported one is refused with its reason), and then the fields the
model fixes (frames per encoder, tokens per frame, visual tokens, text length) must equal the section's. Anything
else is refused with the model id and the field: never a model that computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merv_fast.config import PRESET_ALIASES, ConfigError, ModelConfig, apply_overrides, get_preset
from merv_fast.config import RELEASE_MODELS as RELEASE_MODEL_IDS


@dataclass(frozen=True)
class Component:
    """A pretrained part a release model names: an encoder (`kind` = our encoder name) or the LLM (`kind` = "llm"),
    and the Hugging Face repository its weights come from (found offline: merv_fast/pretrained/sources.py)."""

    id: str
    kind: str
    repo: str


_SIGLIP_TIMM = {"siglip-vit-b16-224px-all-no-cls": "vit_base_patch16_siglip_224.webli",
                "siglip-vit-b16-224px": "vit_base_patch16_siglip_224.webli",
                "siglip-vit-b16-256px": "vit_base_patch16_siglip_256.webli",
                "siglip-vit-b16-384px": "vit_base_patch16_siglip_384.webli",
                "siglip-vit-so400m": "vit_so400m_patch14_siglip_224.webli",
                "siglip-vit-so400m-384px": "vit_so400m_patch14_siglip_384.webli"}
# The repositories the release loads each part from (merv/models/backbones/video/*.py, backbones/llm/*.py).
COMPONENTS = {c.id: c for c in (
    Component("languagebind-video-noclass", "languagebind", "LanguageBind/LanguageBind_Video_merge"),
    Component("dinov2-video-all-tokens", "dinov2", "timm/vit_large_patch14_reg4_dinov2.lvd142m"),
    Component("vivit-google-b-all-no-cls-16frames", "vivit", "google/vivit-b-16x2-kinetics400"),
    *(Component(bid, "siglip", f"timm/{name}") for bid, name in _SIGLIP_TIMM.items()),
    Component("llama2-7b-pure", "llm", "meta-llama/Llama-2-7b-hf"),
    Component("llama2-13b-pure", "llm", "meta-llama/Llama-2-13b-hf"),
    Component("llama2-7b-chat", "llm", "meta-llama/Llama-2-7b-chat-hf"),
    Component("llama2-13b-chat", "llm", "meta-llama/Llama-2-13b-chat-hf"),
    Component("vicuna-v15-7b", "llm", "lmsys/vicuna-7b-v1.5"),
    Component("vicuna-v15-13b", "llm", "lmsys/vicuna-13b-v1.5"),
    Component("llama3-8b-pure", "llm", "meta-llama/Meta-Llama-3-8B"),
    Component("llama3-8b-chat", "llm", "meta-llama/Meta-Llama-3-8B-Instruct"),
    Component("llama3.1-8b-chat", "llm", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
    Component("qwen2.5-3b-instruct", "llm", "Qwen/Qwen2.5-3B-Instruct"),
    Component("qwen2.5-7b-instruct", "llm", "Qwen/Qwen2.5-7B-Instruct"),
    # our test-size presets' parts: no release model uses them (tests lay them out as a local hub cache)
    Component("tiny-languagebind", "languagebind", "merv-fast/tiny-languagebind"),
    Component("tiny-dinov2", "dinov2", "merv-fast/tiny-dinov2"),
    Component("tiny-vivit", "vivit", "merv-fast/tiny-vivit"),
    Component("tiny-siglip", "siglip", "merv-fast/tiny-siglip"),
    Component("tiny-llm", "llm", "merv-fast/tiny-llm"),
)}

# merv/conf/models.py:100-119: what `load_vid` fills in for a field the section leaves out
RELEASE_DEFAULTS = {
    "arch_specifier": "no-align+3davg+linear", "feature_fusion": "cross_attention_avg_lq",
    "video_backbone_ids": ["languagebind-video-noclass", "dinov2-video-all-tokens",
                           "vivit-google-b-all-no-cls-16frames", "siglip-vit-b16-224px-all-no-cls"],
    "llm_backbone_id": "llama2-7b-pure", "image_resize_strategy": "resize-naive", "llm_max_length": 2048,
    "num_frames": [16, 16, 32, 16], "projector_token_length": 64, "visual_feature_length": 1024,
}
FIELDS = ("arch_specifier", "feature_fusion", "video_backbone_ids", "llm_backbone_id", "image_resize_strategy",
          "llm_max_length", "num_frames", "projector_token_length", "visual_feature_length")
BUILT = FIELDS[:5]  # the fields that choose the model; the rest it fixes, and they are checked


@dataclass(frozen=True)
class ReleaseModel:
    """A release model as ours: the preset it starts from, the overrides that make it, the release ids of its parts
    (for finding them offline) and the section's model id."""

    model_id: str
    preset: str
    video_backbone_ids: tuple[str, ...]
    llm_backbone_id: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys applied to the preset


# Our test-size presets, so that export=release round-trips through this module on a laptop: their parts have ids of
# their own (`tiny-*`), which no release model uses.
TEST_MODELS = {"merv-fast-tiny": ("tiny", ("tiny-languagebind", "tiny-dinov2", "tiny-vivit", "tiny-siglip")),
               "merv-fast-single-tiny": ("single-tiny", ("tiny-languagebind",))}


def build_config(row: ReleaseModel) -> ModelConfig:
    return apply_overrides(get_preset(row.preset), row.overrides)


def _fixed_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The section fields a model fixes (not chosen in the section)."""
    _, height, width = cfg.visual.pool_size
    return {"llm_max_length": cfg.llm.max_text_tokens, "num_frames": [e.frames for e in cfg.encoders],
            "projector_token_length": height * width, "visual_feature_length": cfg.num_visual_tokens}


def section_of(row: ReleaseModel, cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The release `model` section that `row` stands for (`cfg`: the model's config, default the row's)."""
    cfg = cfg or build_config(row)
    return {"model_id": row.model_id, "arch_specifier": cfg.visual.arch, "feature_fusion": cfg.visual.fusion,
            "video_backbone_ids": list(row.video_backbone_ids), "llm_backbone_id": row.llm_backbone_id,
            "image_resize_strategy": cfg.visual.image_resize_strategy, **_fixed_fields(cfg)}


def _normalised(section: dict[str, Any]) -> dict[str, Any]:
    """The section as `load_vid` sees it: defaults filled in, lists compared as lists, num_frames paired."""
    full = {**RELEASE_DEFAULTS, **{k: v for k, v in section.items() if k in FIELDS}}
    full["video_backbone_ids"] = list(full["video_backbone_ids"])
    frames = full["num_frames"]
    frames = [frames] * len(full["video_backbone_ids"]) if isinstance(frames, int) else list(frames)
    full["num_frames"] = frames[:len(full["video_backbone_ids"])]
    return full


def release_row(section: dict[str, Any], source: str = "config.json") -> ReleaseModel:
    """The model a release `model` section describes, or ConfigError naming the model id and the field merv_fast
    cannot build."""
    if not isinstance(section, dict) or not isinstance(section.get("model_id"), str):
        raise ConfigError(f"{source}: the 'model' section needs a string 'model_id' (the release's ModelConfig)")
    model_id = section["model_id"]
    full = _normalised(section)

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: release model {model_id!r}: field {key!r} = {full[key]!r}: {why}")

    if model_id in TEST_MODELS:
        preset, parts = TEST_MODELS[model_id]
        row = ReleaseModel(model_id, preset, parts, "tiny-llm")
    else:
        preset = model_id if model_id in RELEASE_MODEL_IDS else "merv-base"
        encoders = full["video_backbone_ids"]
        known = sorted(c.id for c in COMPONENTS.values() if c.kind != "llm" and not c.id.startswith("tiny-"))
        unknown = [e for e in encoders if e not in known]
        if unknown:
            raise refuse("video_backbone_ids", f"merv_fast builds no encoder {unknown[0]!r} (it builds {known})")
        overrides = {"encoders": list(encoders), "llm": full["llm_backbone_id"],
                     "visual.arch": full["arch_specifier"], "visual.fusion": full["feature_fusion"],
                     "visual.image_resize_strategy": full["image_resize_strategy"]}
        row = ReleaseModel(model_id, preset, tuple(encoders), full["llm_backbone_id"], overrides)
    try:
        cfg = build_config(row)
    except ConfigError as err:  # the config names what it refuses; say which field of the section it came from
        key = next((k for k in BUILT if repr(full[k]) in str(err) or str(full[k]) in str(err)), "model")
        raise ConfigError(f"{source}: release model {model_id!r}: field {key!r}: {err}") from None
    for key, value in _fixed_fields(cfg).items():
        if full[key] != value:
            raise refuse(key, f"the model these fields build (preset {row.preset!r}) has {value!r}")
    for key in BUILT:  # the test rows fix their parts and settings too
        if section_of(row, cfg)[key] != full[key]:
            raise refuse(key, f"preset {row.preset!r} has {section_of(row, cfg)[key]!r}")
    return row


def row_for_preset(cfg: ModelConfig) -> ReleaseModel | None:
    """The release model `cfg` is (its parts' release ids), for writing a release run directory and finding parts;
    None for a model whose parts no release id names (a test-width preset other than ours)."""
    for model_id, (preset, parts) in TEST_MODELS.items():
        if cfg.name == preset:
            return ReleaseModel(model_id, preset, parts, "tiny-llm")
    ids = tuple(e.backbone_id for e in cfg.encoders)
    if not all(i in COMPONENTS for i in ids) or cfg.llm.backbone not in COMPONENTS:
        return None
    name = PRESET_ALIASES.get(cfg.name, cfg.name)  # merv-7b is merv-base
    model_id = name if name in RELEASE_MODEL_IDS else f"merv-fast:{cfg.name}"
    return ReleaseModel(model_id, name if name in RELEASE_MODEL_IDS else "merv-base", ids, cfg.llm.backbone)


def release_section(cfg: ModelConfig) -> dict[str, Any]:
    """The `model` section `export=release` writes for `cfg`: the release's fields of this model (the release can
    build it when its id and parts are the release's), or for a model whose parts no release id names, the model id
    `merv-fast:<preset>` and the fields the model fixes (merv_fast reads the exact config from the same file's
    `merv_fast` section)."""
    row = row_for_preset(cfg)
    if row is not None:
        return section_of(row, cfg)
    return {"model_id": f"merv-fast:{cfg.name}", **_fixed_fields(cfg)}
