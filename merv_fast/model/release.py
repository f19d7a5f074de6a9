"""Import and export of the MERV release's checkpoints.

The release saves `torch.save({"model": {"projectors": ..., "feature_fusion": ..., "llm_backbone": ...}, ...})`.
Flattened, its keys for merv-base are
  projectors.{e}.projector.projector.{weight,bias}   (each projector wraps its Linear twice; e = encoder index)
  feature_fusion.Q, feature_fusion.attention.{q,k,v}_proj_weight / in_proj_bias / out_proj.{weight,bias}
  llm_backbone.llm.<transformers key>
and for the other architecture specifiers and fusions whatever the release's modules name (`release_names`).
Some release versions name the fusion group `adapter`, or a single encoder's projector group `projector`; both are
accepted on load. Export always writes `feature_fusion` and `projectors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merv_fast.arch import ArchSpec, parse_arch
from merv_fast.model.strict import WeightsMismatchError, check_weights

FUSION_GROUP_ALIASES = ("feature_fusion", "adapter")
_LAST_LINEAR = {"linear": "", "gelu-mlp": ".2", "fused-gelu-mlp": ".4"}  # the last Linear in the release's MLP


class ReleaseCheckpointError(WeightsMismatchError):
    """A release checkpoint that cannot be read or does not fit the model: names the file and the key."""


def flatten_release(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """`{"model": {"projectors": {...}}}` or already-flat dicts -> one flat `group.key` dict of tensors."""
    if not prefix and "model" in tree and isinstance(tree["model"], dict):
        tree = tree["model"]
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_release(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise ReleaseCheckpointError(f"key {name!r} holds a {type(value).__name__}, not a tensor")
    return flat


def visual_release_name(name: str, spec: ArchSpec, fusion: str) -> str:
    """One of our `visual.*` names -> the release's flat key, for the parsed `visual.arch` and the `visual.fusion`
    (merv/models/vidlms/merv.py:152-227 builds those modules; merv/util/nn_utils.py names their parameters)."""
    parts = name.split(".")
    group, rest = parts[1], parts[2:]
    # A projector is the release's LinearProjector / MLPProjector (`.projector`), wrapped once more when a pooler holds
    # it (`projectors.{e}.projector.projector`, merv.py:152-163) and bare without pooling (merv.py:165-172).
    mlp = ".projector.projector" if spec.pooling else ".projector"
    if group == "projectors":
        return f"projectors.{rest[0]}{mlp}{_LAST_LINEAR[spec.projector]}.{'.'.join(rest[1:])}"
    if group == "heads":
        return f"projectors.{rest[0]}{mlp}.{'.'.join(rest[1:])}"
    if group == "poolers":
        return f"projectors.{'.'.join(rest)}"
    if group == "fusion":
        return "feature_fusion.Q" if rest == ["query"] else "feature_fusion." + ".".join(rest)
    if group == "channel_fusion":
        if rest[0] == "norm":
            return "feature_fusion.0." + ".".join(rest[1:])
        inner = "feature_fusion.1.projector." if fusion == "concat_channel_ln" else "feature_fusion.projector."
        return inner + ".".join(rest[1:])
    raise KeyError(name)


def release_names(model) -> dict[str, str]:
    """Our exported parameter name -> the release's flat key, for every tensor of `model` a release checkpoint holds
    (encoders are frozen and never saved, as in the release)."""
    out = {}
    spec, fusion = parse_arch(model.config.visual.arch), model.config.visual.fusion
    for name in model.state_dict():
        if name.startswith("visual."):
            out[name] = visual_release_name(name, spec, fusion)
        elif name.startswith("llm."):
            out[name] = "llm_backbone.llm." + name[len("llm."):]
    return out


def to_release_state_dict(model) -> dict[str, torch.Tensor]:
    """Our trainable parts in the release's flat key layout."""
    sd = model.state_dict()
    return {theirs: sd[ours].detach() for ours, theirs in release_names(model).items()}


def release_spelling(key: str) -> str:
    """Older spellings the release's loader accepts (merv.py:273-274, 284-289): the fusion group `adapter`, and one
    bare `projector` group for a single-encoder model."""
    if key.startswith("adapter."):
        return "feature_fusion." + key[len("adapter."):]
    if key.startswith("projector."):
        return "projectors.0." + key[len("projector."):]
    return key


def release_to_ours(model) -> dict[str, str]:
    """The release's flat key (any spelling its loader accepts, see `release_spelling`) -> our parameter name, for
    every tensor of `model` a release checkpoint holds."""
    return {theirs: name for name, theirs in release_names(model).items()}


def nest_release(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat release keys -> the release file's nesting: {"projectors": {...}, "feature_fusion": {...}, ...}."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        nested.setdefault(group, {})[rest] = value
    return nested


def load_release_state_dict(model, state_dict: dict[str, Any], source: str = "<state dict>",
                            trained_as: str | None = None) -> None:
    """Load a release checkpoint (nested or flat) into `model`. The file must hold exactly the keys the model expects
    (its names follow the model's `visual.arch` and `visual.fusion`), with their shapes (merv_fast.model.strict):
    nothing is silently dropped or left at random init. `trained_as` (the preset or release model id the file comes
    with, when known) is named in the error."""
    flat = {release_spelling(k): v for k, v in flatten_release(state_dict).items()}
    ours = model.state_dict()
    expected = {theirs: tuple(ours[name].shape) for name, theirs in release_names(model).items()}
    where = (f"{source} (model visual.arch={model.config.visual.arch!r}, "
             f"visual.fusion={model.config.visual.fusion!r})")
    check_weights(expected, {k: tuple(v.shape) for k, v in flat.items()}, where, model.config.name, trained_as,
                  error=ReleaseCheckpointError)
    by_release = release_to_ours(model)
    model.load_state_dict({by_release[k]: v for k, v in flat.items()}, strict=False)  # every key checked above


def read_release_checkpoint(path: str | Path) -> dict[str, Any]:
    """A release training checkpoint's contents, read with `torch.load(..., weights_only=True)` (never unpickles
    code)."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseCheckpointError(f"release checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ReleaseCheckpointError(f"{path}: not a readable weights-only checkpoint ({err})") from err
    if not isinstance(payload, dict):
        raise ReleaseCheckpointError(f"{path}: expected a dict, found {type(payload).__name__}")
    return payload


def load_release_checkpoint(model, path: str | Path, trained_as: str | None = None) -> dict[str, Any]:
    """Read a release training checkpoint into `model`, strictly. Returns the file's other entries (optimizer,
    lr_scheduler, step) untouched."""
    payload = read_release_checkpoint(path)
    load_release_state_dict(model, payload, source=str(path), trained_as=trained_as)
    return {k: v for k, v in payload.items() if k != "model"}


def save_release_checkpoint(model, path: str | Path, **extra: Any) -> None:
    """Write our weights as the release's nested training-checkpoint layout (`{"model": {...}, **extra}`)."""
    torch.save({"model": nest_release(to_release_state_dict(model)), **extra}, Path(path))
