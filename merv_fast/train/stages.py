"""A recipe's stage applied to the model: what it freezes and what `init_from` loads, as the release's
`freeze_backbones` and `load_from_checkpoint` (merv/models/vidlms/merv.py) do for its `--stage`s.

- align: the LLM is frozen; the projectors and the fusion train (its `trainable_module_keys`).
- full-align, finetune, second_finetune: projectors, fusion and LLM train. The encoders are always frozen.
- finetune continues an align run by loading ONLY its projectors (`self.projectors.load_state_dict(...)`): the
  fusion and the LLM start from their initial weights, whatever else the checkpoint holds.
- second_finetune loads projectors, LLM and fusion (`pretrained_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from merv_fast.train.config import Stage

PROJECTORS = "visual.projectors."  # our names of the weights a finetune stage reloads


def freeze_for_stage(model, stage: Stage) -> None:
    """Freeze what `stage` does not train (before the optimizer and FSDP see the parameters)."""
    if not stage.train_llm:
        model.llm.requires_grad_(False)


def apply_recipe(model, recipe: str) -> str:
    """Freeze `model` as `recipe`'s stage trains it (for `merv-fast info --recipe`); returns the release's stage name."""
    from merv_fast.train.config import make_train_config

    stage = make_train_config(recipe).stage
    freeze_for_stage(model, stage)
    return stage.release


def check_stage_fits(stage: Stage, recipe: str, model_cfg) -> None:
    """A stage that continues an align run (finetune, second_finetune) needs an architecture that has one: the
    release's `load_from_checkpoint` loads nothing at all for a `no-align` specifier (merv.py:399-401), which is
    recipe merv-frozen's single stage; refused rather than loading what the release would not."""
    from merv_fast.config import ConfigError

    if stage.init_required and model_cfg.visual.arch.startswith("no-align"):
        raise ConfigError(f"recipe {recipe!r} (the release's {stage.release!r} stage) continues an align run, but "
                          f"visual.arch={model_cfg.visual.arch!r} has no align stage: the release loads no weights "
                          "for a no-align architecture (merv/models/vidlms/merv.py:399-401). Train it with recipe "
                          "merv-frozen, or use an architecture without `no-align+` (merv-full's '3davg+linear')")


def load_initial_weights(model, path: str | Path, stage: Stage) -> dict:
    """Load `init_from` as `stage` does (every trained weight, strictly, or only the projectors); returns the record
    of what was read (run records keep it)."""
    from merv_fast.pretrained.weights import load_weights

    if stage.init_loads == "all":
        return load_weights(model, path).record()
    return load_projectors(model, path).record()


def load_projectors(model, path: str | Path):
    """Only the projectors of a training run (its checkpoint directory), our safetensors export or a release
    checkpoint (its `projectors` group); every projector weight must be there with its shape. Returns the
    WeightsSource read."""
    from merv_fast.model.release import ReleaseCheckpointError, flatten_release, read_release_checkpoint, \
        release_spelling, release_to_ours
    from merv_fast.pretrained.weights import describe_weights, load_training_checkpoint

    source = describe_weights(path)
    path = source.path
    expected = {n: t for n, t in model.state_dict().items() if n.startswith(PROJECTORS)}
    if source.kind == "training checkpoint":
        load_training_checkpoint(model, path, source.trained_as, prefix=PROJECTORS)
        return source
    if source.kind == "safetensors":
        from safetensors.torch import load_file

        found = {k: v for k, v in load_file(str(path)).items() if k.startswith(PROJECTORS)}
        names = {k: k for k in found}
    else:
        flat = flatten_release(read_release_checkpoint(path))
        by_release = release_to_ours(model)
        found, names = {}, {}
        for key, value in flat.items():
            if release_spelling(key).startswith("projectors."):
                ours = by_release.get(release_spelling(key))
                if ours is None or ours not in expected:
                    raise ReleaseCheckpointError(f"{path}: key {key!r} has no place in model {model.config.name!r}")
                found[ours], names[ours] = value, key
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the projectors do not fit model {model.config.name!r}: missing {missing[:4]}, "
                         f"unexpected {[names[k] for k in unexpected[:4]]}")
    for name, value in found.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: key {names[name]!r} has shape {tuple(value.shape)}, model "
                             f"{model.config.name!r} expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        model.load_state_dict(found, strict=False)
    return source
