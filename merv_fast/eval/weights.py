"""The model under evaluation: a preset with the trained weights loaded, in eval mode, and its tokenizer.

`--weights` takes what training writes (merv_fast.train.checkpoint): a training run directory (its newest sharded
checkpoint, `RUN/step-XXXXXXXX`, or one such step directory: the model's weights only, read back with
torch.distributed.checkpoint on one process), our `export_safetensors` file (`*.safetensors`), a release-layout
checkpoint (`export_release`, or the release's own `.pt`, read with `torch.load(weights_only=True)`), or a directory
holding exactly one of those files (the release's run directory: `checkpoints/latest-checkpoint.pt`).
The frozen encoders are not in these files: they come from their configured weights (`encoders.<name>.weights`).
The tokenizer comes from `llm.weights` (a local Hugging Face directory), as in training.
"""

from __future__ import annotations

from pathlib import Path

import torch

RELEASE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def resolve_weights(path: str | Path) -> Path:
    """The weights `path` names: itself (a file or a training checkpoint), the newest training checkpoint of a run
    directory, or the one weights file in a directory."""
    from merv_fast.train.checkpoint import META_FILE, Checkpointer

    path = Path(path)
    if path.is_file() or (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"--weights {str(path)!r}: no such file or directory")
    newest = Checkpointer(path).latest()
    if newest is not None:
        return newest
    release_latest = path / "checkpoints" / "latest-checkpoint.pt"
    if release_latest.is_file():
        return release_latest
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", *RELEASE_SUFFIXES))
    if len(found) != 1:
        raise ValueError(f"--weights {str(path)!r}: expected one *.safetensors or release checkpoint "
                         f"({', '.join(RELEASE_SUFFIXES)}) in the directory, found {[p.name for p in found]}")
    return found[0]


def load_weights(model, path: str | Path) -> Path:
    """Load trained weights into `model` (the encoders excepted); returns the file read."""
    from merv_fast.model.release import load_release_checkpoint
    from merv_fast.train.checkpoint import load_safetensors

    path = resolve_weights(path)
    if path.is_dir():
        load_training_checkpoint(model, path)
    elif path.suffix == ".safetensors":
        load_safetensors(model, path)
    else:
        load_release_checkpoint(model, path)
    return path


def load_training_checkpoint(model, step_dir: Path, prefix: str = "") -> None:
    """The model weights of one of the trainer's checkpoints (the visual path and the LLM, or only the weights named
    `prefix...`; no optimizer state)."""
    import torch.distributed.checkpoint as dcp

    from merv_fast.train.checkpoint import DEFAULT_EXCLUDE, CheckpointError, _quiet_single_process

    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(DEFAULT_EXCLUDE) and k.startswith(prefix)}
    try:
        with _quiet_single_process():  # one process reading a checkpoint that many ranks may have written
            dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(step_dir)))
    except Exception as err:  # DCP raises its own error types; name the checkpoint
        raise CheckpointError(f"{step_dir}: cannot read the model's weights from this checkpoint: {err}") from err
    model.load_state_dict(state, strict=False)


def eval_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bf16 on a GPU (the release evaluates in bf16), fp32 on a CPU, unless asked otherwise."""
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested not in dtypes:
        raise ValueError(f"dtype must be one of {list(dtypes)}, got {requested!r}")
    return dtypes[requested]


def build_eval_model(model_cfg, weights: str | Path | None, device: torch.device, dtype: torch.dtype):
    """(model in eval mode on `device`, the weights file read or None). Without `weights` the preset's random
    init (or `llm.weights`) is evaluated: for tests and benchmarks."""
    from merv_fast.model.merv import build_model

    model = build_model(config=model_cfg, device=device)
    source = load_weights(model, weights) if weights is not None else None
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model, source


def eval_tokenizer(model_cfg):
    """The training tokenizer (`llm.weights`; the in-process tiny tokenizer for random-init test presets)."""
    from merv_fast.model.llm import training_tokenizer

    return training_tokenizer(model_cfg.llm)
