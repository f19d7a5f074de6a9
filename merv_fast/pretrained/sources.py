"""Where a pretrained part's files are on this machine: offline only, nothing is ever downloaded.

A part (an encoder or the LLM's tokenizer, named by a release id: model/release_models.py `COMPONENTS`) is looked
for, in order:
1. under each `--weights-root` directory: `ROOT/<release id>`, `ROOT/<org>/<name>`, `ROOT/<name>` (the repository's
   name), or ROOT itself laid out as a Hugging Face hub cache;
2. in the Hugging Face hub cache (`--hf-cache`, else $HF_HUB_CACHE, else $HF_HOME/hub, else
   ~/.cache/huggingface/hub), laid out as the hub writes it: `models--<org>--<name>/snapshots/<commit>/`, the commit
   named by `refs/main` (or the one snapshot there is).
A candidate counts only when it holds the files the part needs; the error lists every place looked at and what was
missing there.
"""

from __future__ import annotations

import os
from pathlib import Path

from merv_fast.model.release_models import Component

# What a directory must hold to serve as each kind of part: any one file of each group.
ENCODER_FILES = (("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json"),)
TOKENIZER_FILES = (("tokenizer_config.json",), ("tokenizer.json", "tokenizer.model"))


class MissingWeightsError(FileNotFoundError):
    """A pretrained part not found offline; the message says which file and where it looked."""


def default_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ["HF_HOME"]) if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def hub_snapshot(cache: Path, repo: str) -> tuple[Path | None, str]:
    """(the snapshot directory of `repo` in a hub cache, or None; what was looked at, for errors)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshots = base / "snapshots"
    ref = base / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text().strip()
        found = snapshots / commit
        return (found, str(found)) if found.is_dir() else (None, f"{found} (absent)")
    candidates = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(candidates) == 1:
        return candidates[0], str(candidates[0])
    why = f"no refs/main and {len(candidates)} snapshots" if candidates else "absent"
    return None, f"{snapshots}/<commit> ({why})"


def _missing(directory: Path, groups) -> str | None:
    """The first required file absent from `directory` (one of each group), or None when it has them all."""
    for group in groups:
        if not any((directory / name).is_file() for name in group):
            return " or ".join(group)
    return None


def find_part(part: Component, weights_roots: list[str | Path] = (), hub_cache: str | Path | None = None) -> Path:
    """The local directory holding `part` (encoder weights, or the LLM's tokenizer); MissingWeightsError otherwise."""
    groups = TOKENIZER_FILES if part.kind == "llm" else ENCODER_FILES
    org, _, name = part.repo.rpartition("/")
    looked: list[str] = []
    candidates: list[tuple[Path | None, str]] = []
    for root in map(Path, weights_roots):
        for sub in (part.id, f"{org}/{name}", name):
            candidates.append((root / sub, str(root / sub)))
        candidates.append(hub_snapshot(root, part.repo))
    cache = Path(hub_cache) if hub_cache is not None else default_hub_cache()
    candidates.append(hub_snapshot(cache, part.repo))
    for directory, shown in candidates:
        if directory is None:
            looked.append(shown)
            continue
        if not directory.is_dir():
            looked.append(f"{shown} (absent)")
            continue
        missing = _missing(directory, groups)
        if missing is None:
            return directory
        looked.append(f"{shown} (no {missing})")
    what, key = ("tokenizer", "llm.tokenizer") if part.kind == "llm" else \
        (f"{part.kind} encoder weights", f"encoders.{part.kind}.weights")
    need = " and ".join(" or ".join(group) for group in groups)
    raise MissingWeightsError(
        f"{what} of {part.id!r} (Hugging Face repository {part.repo!r}) not found offline: no directory with "
        f"{need}; looked in: " + "; ".join(looked) + ". Put the repository's files in one of these, pass "
        f"--weights-root / --hf-cache, or --set {key}=DIR; nothing is downloaded")
