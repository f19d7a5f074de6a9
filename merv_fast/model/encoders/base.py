"""What every frozen encoder shares: the module contract, checkpoint reading and checked weight loading.

Contract: an encoder is built from its `EncoderConfig`, holds only the `layers_run` blocks it runs, and maps
preprocessed pixels [B, T_in, 3, S, S] to features [B, T_out, H*W, C] (CLS/register tokens dropped, frames in order,
tokens row-major over the patch grid).

Loading: a checkpoint is read whole (safetensors, sharded safetensors, or a torch pickle read with weights_only), the
encoder maps its keys onto its own parameter names (`checkpoint_to_module`), and every parameter the module built must
then be found with the right shape. Keys the module does not need (later blocks, heads, final norms, other towers)
are dropped. A missing or misshapen tensor is an error: we never fall back to random weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from merv_fast.config import EncoderConfig

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A checkpoint that cannot supply this encoder's weights: missing path, missing key or wrong shape."""


class Encoder(nn.Module):
    """Base of the four encoders: the attributes the visual path relies on, and the checkpoint-mapping hook."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.grid = cfg.grid
        self.out_frames = cfg.time_steps
        self.out_dim = cfg.hidden_size

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks that were built (exactly `config.layers_run` of them)."""
        raise NotImplementedError

    def checkpoint_to_module(self, state: StateDict, source: str) -> StateDict:
        """Rename (and reshape where layouts differ) a checkpoint's tensors to this module's parameter names."""
        raise NotImplementedError


def hf_vit_kwargs(cfg: EncoderConfig) -> dict:
    """The config fields the three transformers-based encoders share; only the taken blocks are built."""
    return dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers_run, num_attention_heads=cfg.num_heads,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, image_size=cfg.image_size,
        patch_size=cfg.patch_size, num_channels=3, attn_implementation=cfg.attention,
    )


# ----------------------------------------------------------------------------------------------- reading checkpoints
_DIRECTORY_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def read_checkpoint(path: str | Path) -> tuple[StateDict, str]:
    """A local checkpoint (Hugging Face directory or single file) -> (tensors, the file named in errors)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"encoder weights path {str(path)!r} does not exist")
    if path.is_dir():
        for name in _DIRECTORY_FILES:
            if (path / name).is_file():
                return read_checkpoint(path / name)
        raise WeightsError(f"encoder weights directory {str(path)!r} holds none of {list(_DIRECTORY_FILES)}")
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        state: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_file(path.parent / shard))
        return state, str(path)
    return _read_file(path), str(path)


def _read_file(path: Path) -> StateDict:
    if not path.is_file():
        raise WeightsError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".bin", ".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights one level down
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        return state
    raise WeightsError(f"checkpoint file {str(path)!r}: unknown format (expected .safetensors, .bin, .pt or .pth)")


# ----------------------------------------------------------------------------------------------- key mapping helpers
def find_tower(state: StateDict, anchor: str, source: str) -> StateDict | None:
    """The tensors under whatever prefix holds `anchor` (e.g. `vision_model.`, `vivit.`, `model.video_tower...`),
    keyed relative to that prefix; None when no key ends with `anchor`. Keys outside the tower are left out."""
    prefixes = {k[: len(k) - len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)}
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise WeightsError(f"{source}: several towers hold {anchor!r} (prefixes {sorted(prefixes)}); "
                           "point the weights at a checkpoint with one")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def rename_fragments(state: StateDict, pairs: list[tuple[str, str]], module_keys: set[str]) -> StateDict:
    """Bring key spellings that differ between checkpoints and transformers versions (`attention.attention.query.`
    vs `attention.q_proj.`) to the spelling the built module uses; pairs are (older, newer) and applied in order."""
    for older, newer in pairs:
        if any(newer in k for k in module_keys):
            src, dst = older, newer
        elif any(older in k for k in module_keys):
            src, dst = newer, older
        else:
            continue
        state = {k.replace(src, dst): v for k, v in state.items()}
    return state


_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def convert_timm_blocks(state: StateDict, names: dict[str, str | tuple[str, str, str]], layer_prefix: str) -> StateDict:
    """timm ViT blocks (`blocks.{i}.<part>`) -> `{layer_prefix}{i}.<our part>`.

    `names` maps a timm part (`norm1`, `attn.proj`, `ls1.gamma`...) to ours; a tuple target splits timm's fused
    `attn.qkv` rows into (q, k, v) in that order, which is how timm's Attention reshapes its qkv output."""
    out: StateDict = {}
    for key, value in state.items():
        match = _TIMM_BLOCK.match(key)
        if not match:
            continue
        index, rest = match.groups()
        part = next((p for p in names if rest == p or rest.startswith(p + ".")), None)
        if part is None:
            continue
        suffix = rest[len(part):]
        target = names[part]
        if isinstance(target, tuple):
            for name, chunk in zip(target, value.chunk(3, dim=0)):
                out[f"{layer_prefix}{index}.{name}{suffix}"] = chunk
        else:
            out[f"{layer_prefix}{index}.{target}{suffix}"] = value
    return out


# ----------------------------------------------------------------------------------------------- loading
def load_encoder_weights(module: Encoder, cfg: EncoderConfig) -> None:
    """Fill `module` from `cfg.weights`, or raise `WeightsError` naming the file and the key at fault.

    On the meta device there is nothing to fill: only the path is checked, so a meta build still fails early."""
    if cfg.weights is None:
        return
    if any(p.is_meta for p in module.parameters()):
        if not Path(cfg.weights).exists():
            raise WeightsError(f"{cfg.name} encoder weights path {cfg.weights!r} does not exist")
        return
    state, source = read_checkpoint(cfg.weights)
    mapped = module.checkpoint_to_module(state, source)
    expected = module.state_dict()
    missing = [k for k in expected if k not in mapped]
    if missing:
        sample = sorted(state)[:5]
        raise WeightsError(f"{source}: the {cfg.name} encoder needs {len(missing)} tensor(s) the checkpoint lacks, "
                           f"first {missing[0]!r} (all: {missing[:8]}{' ...' if len(missing) > 8 else ''}); "
                           f"checkpoint keys look like {sample}")
    for key, tensor in expected.items():
        if tuple(mapped[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: {key!r} has shape {tuple(mapped[key].shape)} in the checkpoint, the "
                               f"{cfg.name} encoder built {tuple(tensor.shape)}")
    module.load_state_dict({k: mapped[k] for k in expected}, strict=True)
