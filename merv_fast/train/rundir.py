"""The run directory (`--out`) as a whole: one run per directory, and its metrics log kept in step with its
checkpoints.

- `claim(out, resume, overwrite)`: a directory that already holds a run is continued (`--resume`), moved aside
  (`--overwrite`: renamed to `<out>.replaced-<time>`, never deleted), or refused with one line; training into it
  from step 0 would append a second run's metrics and let pruning delete the checkpoint just written.
- `truncate_metrics(path, step)`: a resumed run drops the metrics rows after its checkpoint's step (a kill after a
  row was written but before its checkpoint was), so every step appears exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# What a training run writes into its directory (merv_fast/train/loop.py, merv_fast/train/checkpoint.py).
RUN_FILES = ("latest", "metrics.jsonl", "summary.json", "model.safetensors", "release_checkpoint.pt")


class RunDirError(ValueError):
    """`--out` holds a run and neither `--resume` nor `--overwrite` was given."""


def run_contents(out: Path) -> list[str]:
    """The names in `out` that make it a training run's directory (empty: none, or no such directory)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or p.name.startswith("step-"))


def claim(out: Path, resume: bool, overwrite: bool, is_main: bool = True) -> Path | None:
    """Make `out` this run's directory. Returns where an old run was moved (`overwrite`), else None. Every rank calls
    it (the refusal is raised everywhere); only the main rank moves anything."""
    found = run_contents(out)
    if not found or resume:
        return None
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirError(f"--out {out} already holds a training run ({shown}): continue it with --resume, or pass "
                          f"--overwrite to move it aside and start anew")
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    if is_main:
        os.replace(out, aside)
    return aside


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of `path` (JSON lines with a "step") up to `step`; drop later ones and unreadable lines (a
    row cut short by a kill). Atomic. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
