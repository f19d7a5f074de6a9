"""`merv-fast data check DATA.json --media-root DIR`: every bad entry of a dataset, with its reason.

Checks, per entry: the JSON entry itself (keys, types, roles, turn order, clip window, a media path that would leave
the media root), then its media through the same code path training uses (`dataset.load_media`: path resolution,
probe, the 32 sampled frame indices, decoding them; or decoding the image). Nothing here raises on bad data: every
problem becomes a row.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merv_fast.data.dataset import FRAMES_SAMPLED, load_media, parse_entries, read_json


@dataclass
class BadEntry:
    index: int | None  # None: the JSON file itself
    id: str | None
    path: str | None  # the media path as written in the JSON
    reason: str
    key: str | None = None  # the JSON key at fault, for entry problems


@dataclass
class CheckReport:
    json_path: str
    media_root: str
    total: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # valid entries per kind
    bad: list[BadEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def _raw_media(raw: Any) -> str | None:
    if isinstance(raw, dict):
        for key in ("video", "image"):
            if isinstance(raw.get(key), str):
                return raw[key]
    return None


def check_dataset(json_path: str | Path, media_root: str | Path, timeout_s: float | None = None,
                  decoder: str = "auto", frames: int = FRAMES_SAMPLED) -> CheckReport:
    from merv_fast.data.decode import MediaError

    report = CheckReport(str(json_path), str(media_root))
    data, file_problem = read_json(json_path)
    if file_problem is not None:
        report.bad.append(BadEntry(None, None, None, file_problem.reason))
        return report
    entries, problems = parse_entries(data)
    report.total = len(data) if isinstance(data, list) else 0
    report.kinds = dict(Counter(e.kind for e in entries))
    by_index: dict[int | None, list] = {}
    for p in problems:
        by_index.setdefault(p.index, []).append(p)
    bad: list[tuple[int, BadEntry]] = []
    for index, found in by_index.items():
        raw = data[index] if index is not None else None
        reason = "; ".join(f"{p.key}: {p.reason}" if p.key else p.reason for p in found)
        bad.append((index if index is not None else -1,
                    BadEntry(index, found[0].id, _raw_media(raw), reason, key=",".join(p.key or "" for p in found))))
    if not Path(media_root).is_dir() and any(e.kind != "text" for e in entries):
        report.bad = [b for _, b in sorted(bad, key=lambda x: x[0])]
        report.bad.append(BadEntry(None, None, str(media_root), "media root is not a directory"))
        return report
    for entry in entries:
        try:
            load_media(entry, media_root, decoder=decoder, timeout_s=timeout_s, frames=frames)
        except MediaError as err:
            bad.append((entry.index, BadEntry(entry.index, entry.id, entry.media, str(getattr(err, "reason", err)))))
        except Exception as err:  # noqa: BLE001 - a checker names every failure instead of stopping at one
            bad.append((entry.index, BadEntry(entry.index, entry.id, entry.media,
                                              f"unexpected {type(err).__name__}: {err}")))
    report.bad = [b for _, b in sorted(bad, key=lambda x: x[0])]
    return report


def format_report(report: CheckReport) -> str:
    lines = []
    if report.bad:
        rows = [("index", "id", "path", "reason")]
        rows += [("-" if b.index is None else str(b.index), b.id or "-", b.path or "-", b.reason) for b in report.bad]
        widths = [min(max(len(r[c]) for r in rows), cap) for c, cap in enumerate((8, 24, 48))]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3])
        lines.append("")
    kinds = ", ".join(f"{report.kinds.get(k, 0)} {k}" for k in ("video", "image", "text"))
    status = "all good" if report.ok else f"{len(report.bad)} bad"
    lines.append(f"{report.json_path}: {report.total} entries ({kinds} well-formed); {status}")
    return "\n".join(lines)


def run_check(json_path: str, media_root: str, as_json: bool = False, timeout_s: float | None = None,
              decoder: str = "auto", out=None) -> int:
    """The CLI's body: print the table (or a JSON list of bad entries); 0 when all good, 1 otherwise."""
    out = out or sys.stdout
    report = check_dataset(json_path, media_root, timeout_s=timeout_s, decoder=decoder)
    if as_json:
        print(json.dumps([asdict(b) for b in report.bad], indent=1), file=out)
    else:
        print(format_report(report), file=out)
    return 0 if report.ok else 1
