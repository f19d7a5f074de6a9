"""Trained weights on disk: what a `--weights` path names, and loading it strictly into a model.

`--weights` takes what training writes (merv_fast.train.checkpoint) and what the release publishes:
- a training run directory (its newest sharded checkpoint, `RUN/step-XXXXXXXX`) or one such step directory: the
  model's weights only, read back with torch.distributed.checkpoint on one process;
- our `export_safetensors` file (`*.safetensors`);
- a release run directory (`config.json` + `checkpoints/latest-checkpoint.pt`: the release's `load_vid` layout, and
  what `export=release` writes), or a release-layout checkpoint file (read with `torch.load(weights_only=True)`);
- a directory holding exactly one `*.safetensors` or release checkpoint file.
Each says what it can about the model it holds (`WeightsSource`): our files record the exact model config, the preset
name and the training seed; a release run directory its `config.json` `model` section (model/release_models.py).

Loading is strict (merv_fast.model.strict): every weight the model expects must come from the file, and nothing else
may be in it; a mismatch names the first missing and unexpected keys and the preset the file says it was trained as.
The frozen encoders are not in these files: they come from their configured weights (`encoders.<name>.weights`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RELEASE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
RELEASE_CONFIG = "config.json"
RELEASE_CHECKPOINT = Path("checkpoints") / "latest-checkpoint.pt"
OURS_KEY = "merv_fast"  # our block in a release run directory's config.json (the release reads only "model")


@dataclass
class WeightsSource:
    """One weights file (or training checkpoint directory) and what it says about the model it holds."""

    path: Path
    kind: str  # "training checkpoint" | "safetensors" | "release checkpoint"
    model_config: dict | None = None  # our exact ModelConfig.to_dict(), when the files record it
    release_section: dict | None = None  # the release config.json's `model` section, beside a release checkpoint
    trained_as: str | None = None  # the preset (or release model id) the files name
    seed: int | None = None  # the training seed (parts at random init, e.g. test encoders, depend on it)

    def record(self) -> dict[str, Any]:
        """What a run records about the weights it read (run.json; a resume must read the same)."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "trained_as": self.trained_as,
                "bytes": self.path.stat().st_size if self.path.is_file() else None}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _training_checkpoint(step_dir: Path) -> WeightsSource:
    from merv_fast.train.checkpoint import META_FILE

    meta = _read_json(step_dir / META_FILE)
    config = meta.get("model_config")
    return WeightsSource(step_dir, "training checkpoint", config, None,
                         config.get("name") if isinstance(config, dict) else None, meta.get("seed"))


def _safetensors(path: Path) -> WeightsSource:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    config = json.loads(meta["model_config"]) if meta.get("model_config") else None
    seed = int(meta["seed"]) if meta.get("seed", "").lstrip("-").isdigit() else None
    return WeightsSource(path, "safetensors", config, None, meta.get("preset") or None, seed)


def _release_run(directory: Path) -> WeightsSource:
    config = _read_json(directory / RELEASE_CONFIG)
    section = config.get("model")
    if not isinstance(section, dict):
        raise ValueError(f"{directory / RELEASE_CONFIG}: no 'model' section (a release run directory's config.json "
                         "holds the release's ModelConfig under 'model')")
    ours = config.get(OURS_KEY) if isinstance(config.get(OURS_KEY), dict) else {}
    return WeightsSource(directory / RELEASE_CHECKPOINT, "release checkpoint", ours.get("model_config"), section,
                         ours.get("preset") or section.get("model_id"), ours.get("seed"))


def describe_weights(path: str | Path) -> WeightsSource:
    """What `path` names (see the module docstring), or ValueError saying why it names nothing usable."""
    from merv_fast.train.checkpoint import META_FILE, Checkpointer

    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _safetensors(path)
        run = path.parent.parent
        if path.name == RELEASE_CHECKPOINT.name and (run / RELEASE_CONFIG).is_file() and \
                run / RELEASE_CHECKPOINT == path:
            return _release_run(run)
        return WeightsSource(path, "release checkpoint")
    if not path.is_dir():
        raise ValueError(f"--weights {str(path)!r}: no such file or directory")
    if (path / META_FILE).is_file():
        return _training_checkpoint(path)
    if (path / RELEASE_CHECKPOINT).is_file():
        if (path / RELEASE_CONFIG).is_file():
            return _release_run(path)
        return WeightsSource(path / RELEASE_CHECKPOINT, "release checkpoint")
    newest = Checkpointer(path).latest()
    if newest is not None:
        return _training_checkpoint(newest)
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", *RELEASE_SUFFIXES))
    if len(found) != 1:
        raise ValueError(f"--weights {str(path)!r}: expected a training run or checkpoint, a release run directory "
                         f"({RELEASE_CONFIG} + {RELEASE_CHECKPOINT}), or one *.safetensors or release checkpoint "
                         f"({', '.join(RELEASE_SUFFIXES)}) in the directory, found {[p.name for p in found]}")
    return describe_weights(found[0])


def load_weights(model, path: str | Path | WeightsSource) -> WeightsSource:
    """Load trained weights into `model` (the encoders excepted), strictly; returns what was read."""
    from merv_fast.model.release import load_release_checkpoint
    from merv_fast.train.checkpoint import load_safetensors

    source = path if isinstance(path, WeightsSource) else describe_weights(path)
    if source.kind == "training checkpoint":
        load_training_checkpoint(model, source.path, source.trained_as)
    elif source.kind == "safetensors":
        load_safetensors(model, source.path, trained_as=source.trained_as)
    else:
        load_release_checkpoint(model, source.path, trained_as=source.trained_as)
    return source


def load_training_checkpoint(model, step_dir: Path, trained_as: str | None = None, prefix: str = "") -> None:
    """The model weights of one of the trainer's checkpoints (the visual path and the LLM, or only the weights named
    `prefix...`; no optimizer state), after checking that the checkpoint holds exactly those."""
    import torch.distributed.checkpoint as dcp

    from merv_fast.model.strict import check_weights
    from merv_fast.train.checkpoint import DEFAULT_EXCLUDE, CheckpointError, _quiet_single_process

    state = {k: v for k, v in model.state_dict().items() if not k.startswith(DEFAULT_EXCLUDE) and k.startswith(prefix)}
    reader = dcp.FileSystemReader(str(step_dir))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except Exception as err:  # DCP raises its own error types; name the checkpoint
        raise CheckpointError(f"{step_dir}: cannot read this checkpoint's index: {err}") from err
    found = {k[len("model."):]: tuple(getattr(v, "size", ())) for k, v in stored.items()
             if k.startswith("model." + prefix)}
    check_weights({k: tuple(v.shape) for k, v in state.items()}, found, str(step_dir), model.config.name, trained_as)
    try:
        with _quiet_single_process():  # one process reading a checkpoint that many ranks may have written
            dcp.load({"model": state}, storage_reader=reader)
    except Exception as err:  # DCP raises its own error types; name the checkpoint
        raise CheckpointError(f"{step_dir}: cannot read the model's weights from this checkpoint: {err}") from err
    model.load_state_dict(state, strict=False)  # the encoders are not in `state`; every other key was checked


def eval_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bf16 on a GPU (the release evaluates in bf16), fp32 on a CPU, unless asked otherwise."""
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested not in dtypes:
        raise ValueError(f"dtype must be one of {list(dtypes)}, got {requested!r}")
    return dtypes[requested]


def build_eval_model(model_cfg, weights: str | Path | WeightsSource | None, device: torch.device,
                     dtype: torch.dtype):
    """(model in eval mode on `device`, the WeightsSource read or None). Without `weights` the preset's random
    init (or `llm.weights`) is evaluated: for tests and benchmarks."""
    from merv_fast.model.merv import build_model

    model = build_model(config=model_cfg, device=device)
    source = load_weights(model, weights) if weights is not None else None
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model, source


def eval_tokenizer(model_cfg):
    """The training tokenizer (`llm.tokenizer` or `llm.weights`; the in-process tiny tokenizer for random-init test
    presets)."""
    from merv_fast.model.llm import training_tokenizer

    return training_tokenizer(model_cfg.llm)
