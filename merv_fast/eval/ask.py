"""`merv-fast ask`: questions about videos answered on the terminal as they are generated.

Answers are printed in order, each streamed token by token while it is the first unfinished one; the answers
generated beside it in the same batch wait in a buffer and appear at once when their turn comes. With several
videos or questions each answer is headed by its video and question.
"""

from __future__ import annotations

import sys
from typing import TextIO

from merv_fast.eval.videolm import VideoLM, pairs
from merv_fast.eval.videos import Clip


class InOrder:
    """`stream(index, text, finished)` for VideoLM.generate, printing answer 0, then 1, ... to `out`."""

    def __init__(self, out: TextIO, headers: list[str] | None):
        self.out, self.headers = out, headers
        self.buffers: dict[int, list[str]] = {}
        self.done: set[int] = set()
        self.front = 0  # the answer being printed live
        self.started = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _begin(self) -> None:
        if not self.started:
            self.started = True
            if self.headers is not None:
                gap = "\n" if self.front else ""  # a blank line between answers
                self._write(f"{gap}== {self.headers[self.front]}\n")

    def __call__(self, index: int, text: str, finished: bool) -> None:
        self.buffers.setdefault(index, []).append(text)
        if finished:
            self.done.add(index)
        while True:
            self._begin()
            self._write("".join(self.buffers.pop(self.front, [])))
            if self.front not in self.done:
                return
            self._write("\n")
            self.front += 1
            self.started = False
            if self.front not in self.buffers and self.front not in self.done:
                return


def run_ask(videolm: VideoLM, videos: list[str], questions: list[str], start_s: float | None = None,
            end_s: float | None = None, end_frame: int | None = None, out: TextIO | None = None,
            **generation) -> list[str]:
    """Answer every (video, question) pair (`pairs`: one video with several questions, several videos with one
    question, or as many of each), printing to `out` (default: stdout) as it goes; returns the answers."""
    clips = [Clip(v, start_s, end_s, end_frame) for v in videos]
    clips, questions = pairs(clips, questions)
    headers = None if len(questions) == 1 else [f"{c.path}: {q}" for c, q in zip(clips, questions)]
    return videolm.generate(clips, questions, stream=InOrder(out or sys.stdout, headers), **generation)
