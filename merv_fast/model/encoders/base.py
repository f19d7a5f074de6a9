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
import torch.nn.functional as F
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

    # timm's block part names -> ours, and our block prefix: set by encoders that read timm checkpoints, so that a
    # missing tensor's error can name the checkpoint key it should have come from.
    TIMM_BLOCK_NAMES: dict = {}
    TIMM_LAYER_PREFIX = ""

    def checkpoint_key(self, module_key: str, state: StateDict) -> str:
        """The checkpoint key a module tensor is read from, as best said without reading it: timm's block name for a
        timm checkpoint, else the module key under the checkpoint's tower prefix (renamed spellings aside)."""
        if self.TIMM_LAYER_PREFIX and module_key.startswith(self.TIMM_LAYER_PREFIX) and any(
                k.endswith("blocks.0.attn.qkv.weight") for k in state):
            index, rest = module_key[len(self.TIMM_LAYER_PREFIX):].split(".", 1)
            for theirs, ours in self.TIMM_BLOCK_NAMES.items():
                for i, name in enumerate(ours if isinstance(ours, tuple) else (ours,)):
                    if rest.startswith(name + "."):
                        part = f" (rows {i + 1} of 3)" if isinstance(ours, tuple) else ""
                        return f"blocks.{index}.{theirs}{rest[len(name):]}{part}"
        # A Hugging Face layout keeps our names under the tower's prefix: find it from a key both share.
        for key in state:
            for ours in self.state_dict():
                if key.endswith(ours):
                    return key[: len(key) - len(ours)] + module_key
        return module_key


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


def resample_patch_positions(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, n, C] patch position embeddings on a square grid -> [1, H*W, C], as timm's `resample_abs_pos_embed`:
    bicubic, antialias, computed in float32, unchanged when the grid already matches."""
    side = int(round(positions.shape[1] ** 0.5))
    if side * side != positions.shape[1]:
        raise WeightsError(f"position embeddings for {positions.shape[1]} patches are not a square grid")
    if (side, side) == tuple(grid):
        return positions
    width = positions.shape[-1]
    image = positions.float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, width).to(positions.dtype)


# ----------------------------------------------------------------------------------------------- loading
def load_encoder_weights(module: Encoder, cfg: EncoderConfig) -> None:
    """Fill `module` from `cfg.weights`, or raise `WeightsError` naming the file and the key at fault.

    On the meta device there is nothing to fill: only the path is checked, so a meta build still fails early."""
    if cfg.weights is None:
        return
    if any(p.is_meta for p in module.parameters()):
        if not Path(cfg.weights).exists():
            raise WeightsError(f"{cfg.name} encoder weights path {cfg.weights!r} does not exist")
        check_checkpoint_config(cfg)
        return
    check_checkpoint_config(cfg)
    state, source = read_checkpoint(cfg.weights)
    mapped = module.checkpoint_to_module(state, source)
    expected = module.state_dict()
    missing = [k for k in expected if k not in mapped]
    if missing:
        sample = sorted(state)[:5]
        raise WeightsError(f"{source}: the {cfg.name} encoder needs {len(missing)} tensor(s) the checkpoint lacks, "
                           f"first ours {missing[0]!r} = checkpoint key {module.checkpoint_key(missing[0], state)!r} "
                           f"(all ours: {missing[:8]}{' ...' if len(missing) > 8 else ''}); "
                           f"checkpoint keys look like {sample}")
    for key, tensor in expected.items():
        if tuple(mapped[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: {key!r} has shape {tuple(mapped[key].shape)} in the checkpoint, the "
                               f"{cfg.name} encoder built {tuple(tensor.shape)}")
    module.load_state_dict({k: mapped[k] for k in expected}, strict=True)


# ----------------------------------------------------------------------------------------------- the weights' config
# What a checkpoint's own config.json says about its architecture, per field (its Hugging Face name, or timm's), and
# the value our preset expects. A checkpoint of another architecture whose tensor shapes happen to fit (another
# activation, norm eps, patch size, frame count, depth) is refused here, before any tensor is read.
def _expected_fields(cfg: EncoderConfig) -> dict[str, object]:
    fields: dict[str, object] = {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.checkpoint_image_size or cfg.image_size, "patch_size": cfg.patch_size,
        "num_features": cfg.hidden_size,  # timm's config.json
    }
    if cfg.name == "dinov2":
        fields["mlp_ratio"] = cfg.intermediate_size // cfg.hidden_size
        fields["num_register_tokens"] = cfg.registers
    else:
        fields["intermediate_size"] = cfg.intermediate_size
    if cfg.name == "vivit":
        fields["num_frames"] = cfg.frames
        fields["tubelet_size"] = [cfg.tubelet, cfg.patch_size, cfg.patch_size]
    if cfg.name == "languagebind":
        fields["num_frames"] = cfg.clip_frames
    return fields


# The release ran SigLIP through timm, whose ViT uses exact GELU on the same weights that Hugging Face's SigLIP config
# declares with the tanh approximation (merv/models/backbones/video/siglip.py:53): the same checkpoint, not another.
_SAME_ACTIVATION = {("siglip", "gelu_pytorch_tanh"), ("siglip", "gelu")}


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(float(a) - float(b)) <= 1e-12
    return a == b


def checkpoint_config_file(weights: str | Path) -> Path | None:
    path = Path(weights)
    folder = path if path.is_dir() else path.parent
    found = folder / "config.json"
    return found if found.is_file() else None


def check_checkpoint_config(cfg: EncoderConfig) -> None:
    """Compare the weights' config.json (if there is one) with the preset, field by field; a mismatch is a
    WeightsError naming the file, the field and both values."""
    file = checkpoint_config_file(cfg.weights)
    if file is None:
        return
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{file}: unreadable config.json ({err})") from None
    if isinstance(config.get("vision_config"), dict):  # a whole CLIP / SigLIP model: its vision tower's config
        config = config["vision_config"]
    for field, expected in _expected_fields(cfg).items():
        if field not in config:
            continue
        found = config[field]
        if field == "hidden_act" and (cfg.name, found) in _SAME_ACTIVATION and (cfg.name, expected) in _SAME_ACTIVATION:
            continue
        if not _close(found, expected):
            raise WeightsError(f"{file}: {field} is {found!r} in the checkpoint's config, the {cfg.name} encoder of "
                               f"this preset expects {expected!r}")
