"""The release's models as our presets: ONE table from the `model` section of a release run directory's
`config.json` to the preset that computes that model (plus overrides), and back, for `export=release`.

A release run directory (what `load_vid` reads, merv/models/load_vid.py:53-79, and what its hub serves per model id)
holds `config.json` and `checkpoints/latest-checkpoint.pt`. The `model` section's fields are the release's
`ModelConfig` (merv/conf/models.py:26-43): model_id, arch_specifier, feature_fusion, video_backbone_ids,
llm_backbone_id, image_resize_strategy, llm_max_length, num_frames, projector_token_length, visual_feature_length.
A field the section leaves out takes `MERV_Base`'s value, as `load_vid` builds `MERV_Base(**section)`
(load_vid.py:79; models.py:100-119); `num_frames` pairs with the encoders as the release's `zip` does
(materialize.py:115).

A section builds a model only when a row below matches it in every field: its model id names the row (another id
matches a row whose every other field agrees: a run trained under its own name), and the fields the preset fixes
(encoders, frames per encoder, tokens per frame, visual tokens, text length) are read off the preset. Anything else
is refused with the id and the first field that differs: never a model that computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merv_fast.config import ConfigError, ModelConfig, get_preset


@dataclass(frozen=True)
class Component:
    """A pretrained part a release model id names: an encoder (`kind` = our encoder name) or the LLM (`kind` =
    "llm"), and the Hugging Face repository its weights come from (found offline: merv_fast/pretrained/sources.py)."""

    id: str
    kind: str
    repo: str


COMPONENTS = {c.id: c for c in (
    # the release's (merv/models/backbones/video/*.py, merv/models/backbones/llm/llama2.py)
    Component("languagebind-video-noclass", "languagebind", "LanguageBind/LanguageBind_Video_merge"),
    Component("dinov2-video-all-tokens", "dinov2", "timm/vit_large_patch14_reg4_dinov2.lvd142m"),
    Component("vivit-google-b-all-no-cls-16frames", "vivit", "google/vivit-b-16x2-kinetics400"),
    Component("siglip-vit-b16-224px-all-no-cls", "siglip", "timm/vit_base_patch16_siglip_224.webli"),
    Component("llama2-7b-pure", "llm", "meta-llama/Llama-2-7b-hf"),
    # our test-size presets' parts: no release model uses them (tests lay them out as a local hub cache)
    Component("tiny-languagebind", "languagebind", "merv-fast/tiny-languagebind"),
    Component("tiny-dinov2", "dinov2", "merv-fast/tiny-dinov2"),
    Component("tiny-vivit", "vivit", "merv-fast/tiny-vivit"),
    Component("tiny-siglip", "siglip", "merv-fast/tiny-siglip"),
    Component("tiny-llm", "llm", "merv-fast/tiny-llm"),
)}

RELEASE_ENCODERS = ("languagebind-video-noclass", "dinov2-video-all-tokens", "vivit-google-b-all-no-cls-16frames",
                    "siglip-vit-b16-224px-all-no-cls")
TINY_ENCODERS = ("tiny-languagebind", "tiny-dinov2", "tiny-vivit", "tiny-siglip")
# The release builds its fusion for one encoder too; its softmax over one key is exactly 1, so our single-encoder
# presets have none and these checkpoint groups are dropped on load (model/release.py `unused`).
ONE_ENCODER_FUSION = ("feature_fusion.", "adapter.")


@dataclass(frozen=True)
class ReleaseModel:
    """One row: a release model id, the preset computing it, and the release's values of the other fields."""

    model_id: str
    preset: str
    video_backbone_ids: tuple[str, ...]
    llm_backbone_id: str
    arch_specifier: str = "no-align+3davg+linear"
    feature_fusion: str = "cross_attention_avg_lq"
    image_resize_strategy: str = "resize-naive"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys applied to the preset
    unused: tuple[str, ...] = ()  # release checkpoint key prefixes the preset does without


RELEASE_MODELS = (
    ReleaseModel("merv-base", "merv-7b", RELEASE_ENCODERS, "llama2-7b-pure"),
    ReleaseModel("languagebind-single", "single-7b", RELEASE_ENCODERS[:1], "llama2-7b-pure",
                 unused=ONE_ENCODER_FUSION),
    # our test-size presets, so that export=release round-trips through this table on a laptop
    ReleaseModel("merv-fast-tiny", "tiny", TINY_ENCODERS, "tiny-llm"),
    ReleaseModel("merv-fast-single-tiny", "single-tiny", TINY_ENCODERS[:1], "tiny-llm", unused=ONE_ENCODER_FUSION),
)

# merv/conf/models.py:100-119: what `load_vid` fills in for a field the section leaves out
RELEASE_DEFAULTS = {
    "arch_specifier": "no-align+3davg+linear", "feature_fusion": "cross_attention_avg_lq",
    "video_backbone_ids": list(RELEASE_ENCODERS), "llm_backbone_id": "llama2-7b-pure",
    "image_resize_strategy": "resize-naive", "llm_max_length": 2048, "num_frames": [16, 16, 32, 16],
    "projector_token_length": 64, "visual_feature_length": 1024,
}
FIELDS = ("arch_specifier", "feature_fusion", "video_backbone_ids", "llm_backbone_id", "image_resize_strategy",
          "llm_max_length", "num_frames", "projector_token_length", "visual_feature_length")


def section_of(row: ReleaseModel, cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The release `model` section that `row` stands for (`cfg`: the model's config, default the row's preset)."""
    cfg = cfg or build_config(row)
    _, height, width = cfg.visual.pool_size
    return {
        "model_id": row.model_id, "arch_specifier": row.arch_specifier, "feature_fusion": row.feature_fusion,
        "video_backbone_ids": list(row.video_backbone_ids), "llm_backbone_id": row.llm_backbone_id,
        "image_resize_strategy": row.image_resize_strategy, "llm_max_length": cfg.llm.max_text_tokens,
        "num_frames": [e.frames for e in cfg.encoders], "projector_token_length": height * width,
        "visual_feature_length": cfg.visual.num_tokens,
    }


def build_config(row: ReleaseModel) -> ModelConfig:
    from merv_fast.config import apply_overrides

    return apply_overrides(get_preset(row.preset), row.overrides)


def _normalised(section: dict[str, Any]) -> dict[str, Any]:
    """The section as `load_vid` sees it: defaults filled in, lists compared as lists, num_frames paired."""
    full = {**RELEASE_DEFAULTS, **{k: v for k, v in section.items() if k in FIELDS}}
    full["video_backbone_ids"] = list(full["video_backbone_ids"])
    frames = full["num_frames"]
    frames = [frames] * len(full["video_backbone_ids"]) if isinstance(frames, int) else list(frames)
    full["num_frames"] = frames[:len(full["video_backbone_ids"])]
    return full


def _first_difference(row: ReleaseModel, section: dict[str, Any]) -> tuple[str, Any, Any] | None:
    expected = section_of(row)
    return next(((k, section[k], expected[k]) for k in FIELDS if section[k] != expected[k]), None)


def release_row(section: dict[str, Any], source: str = "config.json") -> ReleaseModel:
    """The row that computes the model a release `model` section describes, or ConfigError naming the model id and
    the field that no row supports."""
    if not isinstance(section, dict) or not isinstance(section.get("model_id"), str):
        raise ConfigError(f"{source}: the 'model' section needs a string 'model_id' (the release's ModelConfig)")
    model_id = section["model_id"]
    full = _normalised(section)
    by_id = {r.model_id: r for r in RELEASE_MODELS}
    if model_id in by_id:
        difference = _first_difference(by_id[model_id], full)
        if difference is None:
            return by_id[model_id]
        key, got, want = difference
        raise ConfigError(f"{source}: release model {model_id!r}: field {key!r} is {got!r}; merv_fast builds "
                          f"{model_id!r} (preset {by_id[model_id].preset!r}) only with {want!r}")
    matching = [r for r in RELEASE_MODELS if _first_difference(r, full) is None]
    if matching:
        return matching[0]
    closest = min(RELEASE_MODELS, key=lambda r: sum(full[k] != section_of(r)[k] for k in FIELDS))
    key, got, want = _first_difference(closest, full)
    raise ConfigError(f"{source}: release model {model_id!r} is not one merv_fast can build: the nearest, "
                      f"{closest.model_id!r} (preset {closest.preset!r}), has field {key!r} = {want!r}, this one "
                      f"{got!r}. Supported release models: {sorted(by_id)}")


def row_for_preset(cfg: ModelConfig) -> ReleaseModel | None:
    """The row whose preset `cfg` was built from (by name), for writing a release run directory."""
    return next((r for r in RELEASE_MODELS if r.preset == cfg.name), None)


def release_section(cfg: ModelConfig) -> dict[str, Any]:
    """The `model` section `export=release` writes for `cfg`: its row's, or for a preset without a release model,
    the model id `merv-fast:<preset>` and the fields the preset fixes (the release cannot build those; merv_fast
    reads the exact config from the same file's `merv_fast` section)."""
    row = row_for_preset(cfg)
    if row is not None:
        return section_of(row, cfg)
    _, height, width = cfg.visual.pool_size
    return {"model_id": f"merv-fast:{cfg.name}", "llm_max_length": cfg.llm.max_text_tokens,
            "num_frames": [e.frames for e in cfg.encoders], "projector_token_length": height * width,
            "visual_feature_length": cfg.visual.num_tokens}
