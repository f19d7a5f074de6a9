"""A checkpoint's manifest: every file it holds with its size and CRC-32, written last, as its completion marker.

`manifest.json` inside `step-XXXXXXXX/`: {"format": 1, "step": N, "files": {"<relative path>": {"size": bytes,
"crc32": int}}}. A checkpoint is complete when its manifest is there; it is intact when every listed file is there
with the recorded size and checksum. The checks name the file they fail on. Pure file work: the Checkpointer
(merv_fast/train/checkpoint.py) splits the files among ranks and gathers the answers.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A manifest that is missing or unreadable (the message names the file)."""


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def list_files(root: Path) -> list[str]:
    """Every regular file under `root` (relative POSIX paths, sorted), the manifest itself excepted."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def describe(root: Path, rels: list[str]) -> dict[str, dict[str, int]]:
    """{file: {"size", "crc32"}} for `rels` under `root`."""
    return {rel: {"size": (root / rel).stat().st_size, "crc32": file_crc32(root / rel)} for rel in rels}


def write_manifest(root: Path, step: int, files: dict[str, dict[str, int]]) -> None:
    """Write (and fsync) the manifest: the last file of a checkpoint."""
    with open(root / MANIFEST_FILE, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": int(step), "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(root: Path) -> dict[str, dict[str, int]]:
    """The manifest's files; ManifestError naming the file when it is missing or damaged."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the checkpoint is incomplete (its save never finished)")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("crc32"), int)
                for v in files.values()):
            raise ValueError("'files' is not a table of sizes and checksums")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    return files


def check(root: Path, files: dict[str, dict[str, int]], rels: list[str]) -> list[str]:
    """Problems of the files `rels` (keys of `files`) under `root`: missing, another size, another checksum."""
    problems = []
    for rel in rels:
        path, want = root / rel, files[rel]
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{path} is {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif file_crc32(path) != want["crc32"]:
            problems.append(f"{path} does not match its checksum (corrupted)")
    return problems
