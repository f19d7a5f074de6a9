"""A trained MERV from its files alone: the model a `--weights` path describes, its pretrained parts found offline,
built and loaded strictly (`build_pretrained`, behind `merv_fast.load_pretrained` and `merv-fast ask/eval --weights`).

The model's config comes from the weights themselves: our files record the exact config (pretrained/weights.py);
a release run directory's `config.json` `model` section goes through the table (model/release_models.py), whose row
also names each pretrained part (encoders; the LLM's tokenizer), found by pretrained/sources.py unless the config
already sets its directory. The release's checkpoint holds the whole LLM, so the LLM's base weights are never read:
only its tokenizer. Overrides (`--set`) apply on top, for how the model runs (`llm.attention`, `encoders.mode`) or
where a part lives (`encoders.dinov2.weights=DIR`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from merv_fast.config import ModelConfig, apply_overrides, model_config_from_dict
from merv_fast.pretrained.weights import WeightsSource, build_eval_model, describe_weights, eval_dtype, eval_tokenizer


def with_parts(cfg: ModelConfig, row, weights_roots=(), hub_cache=None, recorded: bool = False) -> ModelConfig:
    """`cfg` with the pretrained parts of release model `row` found offline (encoders' `weights`, the LLM's
    `tokenizer`): every part the config does not place, or, for a config recorded by a run (`recorded`), every part
    whose recorded directory is not on this machine (a part recorded as None stayed at random init in training)."""
    from merv_fast.model.release_models import COMPONENTS
    from merv_fast.pretrained.sources import find_part

    def wanted(directory: str | None) -> bool:
        return directory is not None and not Path(directory).exists() if recorded else directory is None

    cfg = dataclasses.replace(cfg, encoders=[dataclasses.replace(e) for e in cfg.encoders],
                              llm=dataclasses.replace(cfg.llm))
    for enc, part_id in zip(cfg.encoders, row.video_backbone_ids):
        if wanted(enc.weights):
            enc.weights = str(find_part(COMPONENTS[part_id], weights_roots, hub_cache))
    llm = cfg.llm
    if (wanted(llm.tokenizer) if llm.tokenizer is not None else wanted(llm.weights)):
        # the checkpoint holds the whole LLM: only its tokenizer is read from the part
        llm.weights, llm.tokenizer = None, str(find_part(COMPONENTS[row.llm_backbone_id], weights_roots, hub_cache))
    return cfg


def config_for_weights(source: WeightsSource, overrides: dict[str, Any] | None = None, weights_roots=(),
                       hub_cache=None) -> ModelConfig | None:
    """The model `source` holds, with `overrides` applied and its pretrained parts placed; None when the files do
    not say (a bare checkpoint file: the caller names a preset)."""
    from merv_fast.model.release_models import build_config, release_row, row_for_preset

    if source.model_config is not None:
        cfg = apply_overrides(model_config_from_dict(source.model_config, str(source.path)), overrides or {})
        row = row_for_preset(cfg)
        return with_parts(cfg, row, weights_roots, hub_cache, recorded=True) if row is not None else cfg
    if source.release_section is None:
        return None
    row = release_row(source.release_section, str(source.path.parent.parent / "config.json"))
    cfg = apply_overrides(build_config(row), overrides or {})
    return with_parts(cfg, row, weights_roots, hub_cache)


def build_pretrained(path: str | Path, *, overrides: dict[str, Any] | None = None, weights_roots=(),
                     hub_cache: str | Path | None = None, device: str | torch.device | None = None,
                     dtype: str | None = None, seed: int = 0):
    """(model in eval mode, tokenizer, WeightsSource) for the trained weights at `path`. Parts at random init (test
    presets' encoders) are drawn from the training seed the files record (else `seed`), as training drew them."""
    source = describe_weights(path)
    cfg = config_for_weights(source, overrides, weights_roots, hub_cache)
    if cfg is None:
        raise ValueError(f"{source.path}: the file does not say which model it holds (a bare {source.kind}); "
                         "build the model from its preset and load it with merv_fast.pretrained.weights."
                         "load_weights, or use `--preset` on the command line")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(source.seed if source.seed is not None else seed)
        model, _ = build_eval_model(cfg, source, device, eval_dtype(device, dtype))
    return model, eval_tokenizer(cfg), source
