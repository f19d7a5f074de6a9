"""CPU decoding with torchcodec (used only where it imports and works; not a dependency).

Same frame-index meaning as pyav_backend: seek_mode="exact" scans the file, so index i is the i-th frame in
presentation order and num_frames counts what the scan found. torchcodec applies the display rotation itself.
Broken files are classified by pyav_backend's checks first, so both backends name the same reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from merv_fast.data import pyav_backend
from merv_fast.data.media_types import MediaError, VideoInfo


def _decoder(path: Path):
    """(the VideoDecoder, the warnings of the completeness check), or MediaError."""
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC",
                               num_ffmpeg_threads=pyav_backend.DECODE_THREADS)
    except Exception as err:  # torchcodec raises RuntimeError/ValueError for every FFmpeg failure
        # Let PyAV's open and scan name the reason (missing, not a video, truncated, no video stream ...).
        pyav_backend.probe(path)
        raise MediaError(path, f"torchcodec cannot open it: {str(err).splitlines()[0][:200]}") from None
    meta = decoder.metadata
    if not meta.num_frames:
        raise MediaError(path, "zero frames")
    # The same cut-short checks as PyAV's scan; webm/mkv keep their duration in the container header only.
    header_s = meta.duration_seconds_from_header or pyav_backend.container_duration_s(path)
    scanned_s = None
    if meta.end_stream_seconds_from_content is not None:
        scanned_s = meta.end_stream_seconds_from_content - (meta.begin_stream_seconds_from_content or 0.0)
    warnings = pyav_backend.check_complete(path, meta.num_frames_from_header, int(meta.num_frames), header_s,
                                           scanned_s)
    return decoder, warnings


def probe(path: str | Path) -> VideoInfo:
    path = pyav_backend.check_file(path)
    decoder, warnings = _decoder(path)
    meta = decoder.metadata
    return VideoInfo(num_frames=int(meta.num_frames), fps=float(meta.average_fps) if meta.average_fps else None,
                     width=int(meta.width), height=int(meta.height), rotation=int(round(meta.rotation or 0)) % 360,
                     codec=str(meta.codec), duration_s=meta.duration_seconds, warnings=warnings)


def read_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    path = pyav_backend.check_file(path)
    if len(indices) == 0:
        raise ValueError("no frame indices asked for")
    decoder, _ = _decoder(path)
    n = int(decoder.metadata.num_frames)
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise IndexError(f"{path}: frame indices {bad[:4]} outside [0, {n})")
    wanted = sorted({int(i) for i in indices})  # each frame decoded once, in file order
    try:
        frames = decoder.get_frames_at(wanted).data.numpy()
    except Exception as err:
        raise MediaError(path, f"corrupt video: torchcodec failed ({str(err).splitlines()[0][:200]})") from None
    position = {frame: row for row, frame in enumerate(wanted)}
    return frames[[position[int(i)] for i in indices]]
