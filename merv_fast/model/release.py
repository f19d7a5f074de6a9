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

FUSION_GROUP_ALIASES = ("feature_fusion", "adapter")
_PROJECTOR = re.compile(r"^projectors\.(\d+)\.projector\.projector\.(weight|bias)$")


class ReleaseCheckpointError(ValueError):
    """A release checkpoint that does not fit the model: names the file and the key."""


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


def load_release_state_dict(model, state_dict: dict[str, Any], source: str = "<state dict>") -> None:
    """Load a release checkpoint (nested or flat) into `model`. Every expected key must be present with its exact
    shape; any key we do not recognise is an error: nothing is silently dropped or left at random init."""
    flat = flatten_release(state_dict)
    ours = model.state_dict()
    expected = set(_exported_names(model))
    mapped: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        name = release_to_ours(key)
        if name is None or name not in expected:
            raise ReleaseCheckpointError(f"{source}: key {key!r} has no place in model {model.config.name!r}")
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ReleaseCheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, "
                                         f"model {model.config.name!r} expects {tuple(ours[name].shape)}")
        mapped[name] = value
    missing = sorted(expected - set(mapped))
    if missing:
        shown = ", ".join(repr(ours_to_release(n)) for n in missing[:5])
        raise ReleaseCheckpointError(f"{source}: {len(missing)} key(s) missing, e.g. {shown}")
    model.load_state_dict(mapped, strict=False)


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


def load_release_checkpoint(model, path: str | Path) -> dict[str, Any]:
    """Read a release training checkpoint into `model`. Returns the file's other entries (optimizer, lr_scheduler,
    step) untouched."""
    payload = read_release_checkpoint(path)
    load_release_state_dict(model, payload, source=str(path))
    return {k: v for k, v in payload.items() if k != "model"}


def save_release_checkpoint(model, path: str | Path, **extra: Any) -> None:
    """Write our weights as the release's nested training-checkpoint layout (`{"model": {...}, **extra}`)."""
    torch.save({"model": nest_release(to_release_state_dict(model)), **extra}, Path(path))
