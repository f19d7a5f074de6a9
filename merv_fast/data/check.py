"""`merv-fast data check DATA.json --media-root DIR`: every bad entry of a dataset, with its reason.

Checks, per entry: the JSON entry itself (keys, types, roles, turn order, clip window, a media path that would leave
the media root), then its media through the same code path training uses (`dataset.load_media`: path resolution,
probe, the 32 sampled frame indices, decoding them; or decoding the image). Nothing here raises on bad data: every
problem becomes a row. A medium that is odd but usable (every sampled frame decodes) is no problem: its warnings
(the ones training logs) are listed too, and do not change the exit code.
"""

from __future__ import annotations

import json
import logging
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
    severity: str = "error"  # "error": the entry is unusable | "warning": odd but kept


@dataclass
class CheckReport:
    json_path: str
    media_root: str
    total: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # valid entries per kind
    bad: list[BadEntry] = field(default_factory=list)
    warnings: list[BadEntry] = field(default_factory=list)  # severity "warning": usable entries, odd media

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
    warned = _WarningCollector()
    data_log = logging.getLogger("merv_fast.data")
    data_log.addHandler(warned)
    try:
        for entry in entries:
            warned.records.clear()
            try:
                load_media(entry, media_root, decoder=decoder, timeout_s=timeout_s, frames=frames)
            except MediaError as err:
                reason = str(getattr(err, "reason", err))
                bad.append((entry.index, BadEntry(entry.index, entry.id, entry.media, reason)))
                continue
            except Exception as err:  # noqa: BLE001 - a checker names every failure instead of stopping at one
                bad.append((entry.index, BadEntry(entry.index, entry.id, entry.media,
                                                  f"unexpected {type(err).__name__}: {err}")))
                continue
            report.warnings += [BadEntry(entry.index, entry.id, entry.media, message, severity="warning")
                                for message in warned.records]
    finally:
        data_log.removeHandler(warned)
    report.bad = [b for _, b in sorted(bad, key=lambda x: x[0])]
    return report


class _WarningCollector(logging.Handler):
    """The media warnings load_media logs for one entry (records carrying `media_warning`)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        warning = getattr(record, "media_warning", None)
        if warning is not None:
            self.records.append(warning)


def format_report(report: CheckReport) -> str:
    lines = []
    listed = report.bad + report.warnings
    if listed:
        rows = [("index", "id", "path", "reason")]
        rows += [("-" if b.index is None else str(b.index), b.id or "-", b.path or "-",
                  b.reason if b.severity == "error" else f"warning (kept): {b.reason}") for b in listed]
        widths = [min(max(len(r[c]) for r in rows), cap) for c, cap in enumerate((8, 24, 48))]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3])
        lines.append("")
    kinds = ", ".join(f"{report.kinds.get(k, 0)} {k}" for k in ("video", "image", "text"))
    status = "all good" if report.ok else f"{len(report.bad)} bad"
    if report.warnings:
        status += f", {len(report.warnings)} with warnings (usable)"
    lines.append(f"{report.json_path}: {report.total} entries ({kinds} well-formed); {status}")
    return "\n".join(lines)


def run_check(json_path: str, media_root: str, as_json: bool = False, timeout_s: float | None = None,
              decoder: str = "auto", out=None) -> int:
    """The CLI's body: print the table (or a JSON list of the bad entries, then the warnings, each with its
    `severity`); 0 when no entry is bad (warnings or not), 1 otherwise."""
    out = out or sys.stdout
    report = check_dataset(json_path, media_root, timeout_s=timeout_s, decoder=decoder)
    if as_json:
        print(json.dumps([asdict(b) for b in report.bad + report.warnings], indent=1), file=out)
    else:
        print(format_report(report), file=out)
    return 0 if report.ok else 1
