"""Where a run's answers live, so that it can stop and resume: OUT/predictions.rank-XXXXX.jsonl per rank, one JSON
line per answered question, appended and flushed to disk after every batch; broken videos the same way in
OUT/broken.rank-XXXXX.jsonl. A restart reads every rank's file (any earlier world size) and skips the questions
answered there; a line cut short by a kill is ignored (that question is asked again). Broken videos are tried
again on a restart. OUT/run.json records what the predictions mean (task, mode), so that a resume cannot mix modes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "run.json"


def _lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the tail of a killed write
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
    return rows


class PredictionStore:
    def __init__(self, out: str | Path, rank: int = 0):
        self.out = Path(out)
        self.rank = rank
        self.predictions_path = self.out / f"predictions.rank-{rank:05d}.jsonl"
        self.broken_path = self.out / f"broken.rank-{rank:05d}.jsonl"

    def check_run(self, settings: dict) -> None:
        """Record `settings` (rank 0) or check them against the recorded ones: a resume must ask the same thing."""
        path = self.out / RUN_FILE
        if path.is_file():
            recorded = json.loads(path.read_text())
            if recorded != settings:
                raise ValueError(f"{path}: this directory holds a run with {recorded}; now asked for {settings}. "
                                 "Use another --out (or delete it) to start a different run")
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings, indent=1) + "\n")

    def answered(self) -> dict[str, dict]:
        """Every answered question so far, by key, from every rank's file."""
        done: dict[str, dict] = {}
        for path in sorted(self.out.glob("predictions.rank-*.jsonl")):
            for row in _lines(path):
                done.setdefault(row["key"], row)
        return done

    def broken(self) -> list[dict]:
        rows: dict[str, dict] = {}
        for path in sorted(self.out.glob("broken.rank-*.jsonl")):
            for row in _lines(path):
                rows.setdefault(row["key"], row)
        return list(rows.values())

    def start(self) -> None:
        """This rank's broken-video file starts afresh (they are retried); its predictions are kept, less the tail
        of a line a kill cut short (new lines must not be glued onto it)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.broken_path.write_text("")
        if self.predictions_path.is_file():
            data = self.predictions_path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.predictions_path.write_bytes(data[:data.rfind(b"\n") + 1])

    @staticmethod
    def _append(path: Path, rows: list[dict]) -> None:
        if not rows:
            return
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def add(self, predictions: list[dict], broken: list[dict] = ()) -> None:
        self._append(self.predictions_path, predictions)
        self._append(self.broken_path, list(broken))
