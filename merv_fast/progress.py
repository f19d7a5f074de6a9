"""A progress bar: tqdm where it is installed, else one plain line to stderr now and then (and at the end)."""

from __future__ import annotations

import sys
import time


class _Lines:
    def __init__(self, total: int, desc: str, unit: str, every_s: float = 10.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.2f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "items", enabled: bool = True):
    """An object with update(n) and close(); `unit` names what is counted ("questions", "media items")."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Lines(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=f" {unit}")
