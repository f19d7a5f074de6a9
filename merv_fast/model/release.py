"""Import and export of the MERV release's checkpoints.

The release saves `torch.save({"model": {"projectors": ..., "feature_fusion": ..., "llm_backbone": ...}, ...})`.
Flattened, its keys are
  projectors.{e}.projector.projector.{weight,bias}   (each projector wraps its Linear twice; e = encoder index)
  feature_fusion.Q, feature_fusion.attention.{q,k,v}_proj_weight / in_proj_bias / out_proj.{weight,bias}
  llm_backbone.llm.<transformers key>
Some release versions name the fusion group `adapter`; it is accepted on load. Export always writes
`feature_fusion`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from merv_fast.model.strict import WeightsMismatchError, check_weights

FUSION_GROUP_ALIASES = ("feature_fusion", "adapter")
_PROJECTOR = re.compile(r"^projectors\.(\d+)\.projector\.projector\.(weight|bias)$")


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


def release_to_ours(key: str) -> str | None:
    """A flat release key -> our parameter name (None if it is not a model weight we know)."""
    m = _PROJECTOR.match(key)
    if m:
        return f"visual.projectors.{m.group(1)}.{m.group(2)}"
    for group in FUSION_GROUP_ALIASES:
        if key == f"{group}.Q":
            return "visual.fusion.query"
        if key.startswith(f"{group}.attention."):
            return "visual.fusion.attention." + key[len(f"{group}.attention."):]
    if key.startswith("llm_backbone.llm."):
        return "llm." + key[len("llm_backbone.llm."):]
    return None


def ours_to_release(name: str) -> str:
    if name.startswith("visual.projectors."):
        index, leaf = name[len("visual.projectors."):].split(".")
        return f"projectors.{index}.projector.projector.{leaf}"
    if name == "visual.fusion.query":
        return "feature_fusion.Q"
    if name.startswith("visual.fusion.attention."):
        return "feature_fusion.attention." + name[len("visual.fusion.attention."):]
    if name.startswith("llm."):
        return "llm_backbone.llm." + name[len("llm."):]
    raise KeyError(name)


def _exported_names(model) -> list[str]:
    return [n for n in model.state_dict() if n.startswith(("visual.", "llm."))]


def to_release_state_dict(model) -> dict[str, torch.Tensor]:
    """Our trainable parts in the release's flat key layout (encoders are frozen and never saved, as in the release)."""
    sd = model.state_dict()
    return {ours_to_release(n): sd[n].detach() for n in _exported_names(model)}


def nest_release(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat release keys -> the release file's nesting: {"projectors": {...}, "feature_fusion": {...}, ...}."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        nested.setdefault(group, {})[rest] = value
    return nested


def load_release_state_dict(model, state_dict: dict[str, Any], source: str = "<state dict>",
                            trained_as: str | None = None, unused: tuple[str, ...] = ()) -> None:
    """Load a release checkpoint (nested or flat) into `model`. The file must hold exactly the keys the model expects,
    with their shapes (merv_fast.model.strict): nothing is silently dropped or left at random init. `trained_as`
    (the preset or release model id the file comes with, when known) is named in the error. `unused`: release key
    prefixes the caller knows the model does without (model/release_models.py names them per release model, e.g.
    a one-encoder fusion, whose softmax weight is exactly 1); they are dropped, and only they."""
    flat = {k: v for k, v in flatten_release(state_dict).items() if not (unused and k.startswith(unused))}
    ours = model.state_dict()
    expected = {ours_to_release(n): tuple(ours[n].shape) for n in _exported_names(model)}
    # Keys under the fusion group's other name (`adapter`) are compared under the name our export writes.
    found = {(ours_to_release(release_to_ours(k)) if release_to_ours(k) else k): tuple(v.shape)
             for k, v in flat.items()}
    check_weights(expected, found, source, model.config.name, trained_as, error=ReleaseCheckpointError)
    model.load_state_dict({release_to_ours(k): v for k, v in flat.items()}, strict=False)  # every key checked above


def load_release_checkpoint(model, path: str | Path, trained_as: str | None = None,
                            unused: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a release training checkpoint (`torch.load(..., weights_only=True)`: never unpickles code) into `model`.
    Returns the file's other entries (optimizer, lr_scheduler, step) untouched."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseCheckpointError(f"release checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ReleaseCheckpointError(f"{path}: not a readable weights-only checkpoint ({err})") from err
    if not isinstance(payload, dict):
        raise ReleaseCheckpointError(f"{path}: expected a dict, found {type(payload).__name__}")
    load_release_state_dict(model, payload, source=str(path), trained_as=trained_as, unused=unused)
    return {k: v for k, v in payload.items() if k != "model"}


def save_release_checkpoint(model, path: str | Path, **extra: Any) -> None:
    """Write our weights as the release's nested training-checkpoint layout (`{"model": {...}, **extra}`)."""
    torch.save({"model": nest_release(to_release_state_dict(model)), **extra}, Path(path))
