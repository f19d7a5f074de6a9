"""Results files: `bench/results/<YYYY-MM-DD>_<device-slug>_<what>.json` and their `.md` twins.

The layout is the one in shared/BENCH_RESULTS.md. A run appends rows one at a time and both files are rewritten
atomically after each append, so a run killed half-way keeps everything it measured, and reopening the file
carries on where it stopped. A row that measures the same (area, name, config) again replaces the old one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from merv_fast.env import git_sha  # noqa: F401  (re-exported: results and reports stamp the commit they measured)
from merv_fast.measure.ceilings import bytes_s_ceiling, flop_s_ceiling
from merv_fast.measure.timing import Timing

THROUGHPUT_FIELDS = ("samples_per_s", "tokens_per_s", "frames_per_s", "mfu")
# Words in GPU names that say nothing about which chip it is ("NVIDIA H100 80GB HBM3" -> "h100").
_NAME_NOISE = re.compile(r"^(nvidia|geforce|tesla|pcie|sxm\d*|nvl|hbm\d*e?|\d+gb)$")


def device_slug(device: str | torch.device | None = None) -> str:
    """'h100', 'h200', 'a100', 'rtx-4090', '8xh100' for a node's worth; 'cpu-2core' on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return f"cpu-{len(os.sched_getaffinity(0))}core"
    words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
    slug = "-".join(w for w in words if w and not _NAME_NOISE.match(w)) or "gpu"
    count = torch.cuda.device_count()
    return f"{count}x{slug}" if count > 1 else slug


def device_name(device: str | torch.device | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "CPU")
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def results_path(out_dir: str | Path, what: str, *, date: str | None = None, slug: str | None = None) -> Path:
    date = date or dt.date.today().isoformat()
    return Path(out_dir) / f"{date}_{slug or device_slug()}_{what}.json"


def _significant(x: float, digits: int = 4) -> float:
    """Round to `digits` significant figures: enough for a timing, short enough to read."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _timing_dict(timing: Timing) -> dict[str, Any]:
    out = {"median_ms": _significant(timing.median_ms), "p20_ms": _significant(timing.p20_ms),
           "p80_ms": _significant(timing.p80_ms)}
    if timing.peak_mem_bytes is not None:
        out["peak_mem_bytes"] = timing.peak_mem_bytes
    return out


def row(area: str, name: str, config: dict[str, Any], ours: Timing, reference: Timing | None = None, *,
        reference_name: str = "reference", flops: float | None = None, bytes: float | None = None,
        ceilings: dict[str, float] | None = None, **throughput: float) -> dict[str, Any]:
    """One results row. `flops`/`bytes` are the work of one call of `ours`; with the run's `ceilings` they give
    share_of_ceiling (for work that has both, the larger share: the resource that binds). `throughput` takes
    samples_per_s, tokens_per_s, frames_per_s, mfu."""
    unknown = set(throughput) - set(THROUGHPUT_FIELDS)
    if unknown:
        raise TypeError(f"row(): unknown throughput field(s) {sorted(unknown)}; known: {list(THROUGHPUT_FIELDS)}")
    out: dict[str, Any] = {"area": area, "name": name, "config": config, "ours": _timing_dict(ours)}
    if reference is not None:
        out["reference"] = {"name": reference_name, **_timing_dict(reference)}
        out["speedup"] = _significant(reference.median_ms / ours.median_ms, 3)
    seconds = ours.median_ms / 1e3
    shares = []
    if flops and ceilings and flop_s_ceiling(ceilings):
        shares.append(flops / seconds / flop_s_ceiling(ceilings))
    if bytes and ceilings and bytes_s_ceiling(ceilings):
        shares.append(bytes / seconds / bytes_s_ceiling(ceilings))
    if shares:
        out["share_of_ceiling"] = round(max(shares), 3)
    out.update({k: _significant(v) for k, v in throughput.items() if v is not None})
    return out


def _row_key(r: dict[str, Any]) -> tuple:
    return (r.get("area"), r.get("name"), json.dumps(r.get("config"), sort_keys=True))


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsFile:
    """A results file and its markdown twin, kept in step on disk after every change."""

    def __init__(self, path: str | Path, data: dict[str, Any]):
        self.path = Path(path)
        self.data = data

    @classmethod
    def create(cls, path: str | Path, *, command: str, device: str | None = None,
               ceilings: dict[str, float] | None = None, versions: dict[str, Any] | None = None) -> ResultsFile:
        """A new, empty file (overwriting one that is there). Versions default to this environment's."""
        if versions is None:
            from merv_fast.env import versions as current_versions

            versions = current_versions()
        data = {"device": device or device_name(), "date": dt.date.today().isoformat(), "command": command,
                "versions": versions, "ceilings": dict(ceilings or {}), "results": []}
        results = cls(path, data)
        results.save()
        return results

    @classmethod
    def open(cls, path: str | Path) -> ResultsFile:
        """An existing file, to append to (resume)."""
        path = Path(path)
        return cls(path, json.loads(path.read_text()))

    @classmethod
    def open_or_create(cls, path: str | Path, **create_args: Any) -> ResultsFile:
        return cls.open(path) if Path(path).exists() else cls.create(path, **create_args)

    @property
    def ceilings(self) -> dict[str, float]:
        return self.data["ceilings"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["results"]

    def append(self, new_row: dict[str, Any]) -> None:
        """Add a row (replacing one with the same area, name and config) and rewrite both files."""
        key = _row_key(new_row)
        kept = [r for r in self.rows if _row_key(r) != key]
        self.data["results"] = kept + [new_row]
        self.save()

    def set_ceilings(self, ceilings: dict[str, float]) -> None:
        self.data["ceilings"] = dict(ceilings)
        self.save()

    def set_environment(self, report: dict[str, Any]) -> None:
        """Keep merv_fast.env's full report beside the versions (an addition to the BENCH_RESULTS.md layout)."""
        self.data["environment"] = report
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, json.dumps(self.data, indent=2) + "\n")
        _write_atomically(self.path.with_suffix(".md"), render_markdown(self.data))


# ----------------------------------------------------------------------------------------------- markdown
def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|")


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _ours_text(r: dict[str, Any]) -> str:
    ours = r.get("ours") or {}
    if "median_ms" not in ours:
        return ""
    text = f"{ours['median_ms']} ({ours.get('p20_ms', '?')}–{ours.get('p80_ms', '?')})"
    if ours.get("peak_mem_bytes") is not None:
        text += f", peak {ours['peak_mem_bytes'] / 2**20:.0f} MiB"
    return text


def _extras_text(r: dict[str, Any]) -> str:
    parts = [f"{k}={r[k]}" for k in THROUGHPUT_FIELDS if k in r]
    if "tests" in r:
        parts += [f"{k}={v}" for k, v in r["tests"].items()]
    return ", ".join(parts)


RESULT_COLUMNS = ("area", "name", "config", "ours ms (p20–p80)", "reference ms", "speedup", "share of ceiling",
                  "throughput / counts")


def _row_cells(r: dict[str, Any]) -> list[str]:
    reference = r.get("reference")
    ref_text = f"{reference['median_ms']} ({reference.get('name', 'reference')})" if reference else ""
    return [r.get("area"), r.get("name"), _config_text(r.get("config") or {}), _ours_text(r), ref_text,
            r.get("speedup"), r.get("share_of_ceiling"), _extras_text(r)]


def _table(header: Iterable[str], rows: Iterable[list[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in rows]
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    lines = [f"# {data['device']}, {data['date']}", "", f"Command: `{data['command']}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "",
             "Ceilings: " + (", ".join(f"{k} = {v}" for k, v in data["ceilings"].items()) or "not measured"), ""]
    environment = data.get("environment")
    if environment:
        from merv_fast.env import missing_packages

        missing = missing_packages(environment)
        lines += ["Optional packages not usable: " +
                  ("; ".join(f"{name} ({why})" for name, why in missing.items()) or "none"), ""]
    lines += _table(RESULT_COLUMNS, (_row_cells(r) for r in data["results"]))
    return "\n".join(lines) + "\n"


README_COLUMNS = ("device", "date", "area", "name", "ours ms (p20–p80)", "reference ms", "speedup", "share of ceiling",
                  "throughput / counts", "details")
README_CELL_CHARS = 72  # the README's table stays readable; every cell is whole in the results files themselves


def _short(value: Any) -> Any:
    text = "" if value is None else str(value)
    return text if len(text) <= README_CELL_CHARS else text[:README_CELL_CHARS - 1] + "…"


def results_table_markdown(paths: Iterable[str | Path], link_base: str = "bench/results") -> str:
    """The rows of several results files as one markdown table (the README's performance table): no config column
    and long cells cut short, each row linking its results file's `.md` twin, where everything is in full."""
    rows = []
    for path in paths:
        path = Path(path)
        data = json.loads(path.read_text())
        link = f"[{path.stem}]({link_base}/{path.stem}.md)"
        for r in data["results"]:
            area, name, _config, ours, reference, speedup, share, extras = _row_cells(r)
            rows.append([data["device"], data["date"], area, _short(name), ours, _short(reference), speedup, share,
                         _short(extras), link])
    return "\n".join(_table(README_COLUMNS, rows)) + "\n"
