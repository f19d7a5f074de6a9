"""MediaError (a media file that cannot be used, with the path and a short reason) and VideoInfo.

Torch-free on purpose: the decode worker process imports it (see media_worker.py) and starts in a fraction of the
time a torch import takes.
"""

from __future__ import annotations

from dataclasses import dataclass


class MediaError(ValueError):
    """A broken or unreadable media file. `reason` is short and human ("zero bytes", "truncated: ...")."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable with its two fields, so the decode worker can send it back
        return (MediaError, (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What a decoder reports about a clip. `width`/`height` are the displayed size (after `rotation`, the
    counter-clockwise degrees the display matrix asks for), i.e. the size of the frames `decode_video` returns.
    `num_frames` counts the frames the decoder can produce (a packet scan, not the header), and frame index i in
    `decode_video` means the i-th of them in presentation order; `fps` is the average rate (num_frames / duration
    for variable frame rate), used only to turn start/end seconds into indices. `warnings`: odd but usable facts
    worth a log line (a header that promises more frames or seconds than the file holds: see
    pyav_backend.check_complete)."""

    num_frames: int
    fps: float | None
    width: int
    height: int
    rotation: int
    codec: str
    duration_s: float | None
    warnings: tuple[str, ...] = ()
