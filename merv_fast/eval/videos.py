"""A video as the release's evaluation reads it (scripts/eval_mcq.py:136-156 and its `load_video`,
merv/preprocessing/datasets/datasets.py:35-158), in every layout the eight benchmarks ship:

- a video file (.mp4, .mkv, .webm, .avi, ...): the spec's indices over the [start, end] seconds window, or, when the
  question carries Perception Test's `end_frame`, over frames 0..end_frame (datasets.py:131-141);
- a GIF (TGIF-QA): linspace over all of its frames, decoded by Pillow as the release does; a window does not apply
  (datasets.py:116-122);
- a directory of JPEG frames (VLEP): the frames in name order at 3 frames per second, a window in seconds turned
  into frame numbers at that rate (datasets.py:57-91). The release reads frame folders only for VLEP (3 fps) and
  ShareGPT (the whole folder, which are the same indices when no window is given); any folder is read as VLEP's.

The same reader serves `merv-fast eval` and `VideoLM.generate` (merv_fast/pretrained/videolm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from merv_fast.data import pyav_backend
from merv_fast.data.decode import MediaError, choose_decoder, decode_image, decode_video_sampled
from merv_fast.data.frames import sample_frame_indices
from merv_fast.data.media_worker import load_media_with_timeout

FRAME_DIR_FPS = 3.0  # VLEP's frame folders (datasets.py:62-64)
FRAME_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Clip:
    """A video and the part of it to look at: seconds [start_s, end_s] (None: from the start / to the end), or
    frames 0..end_frame (None or negative: unused), which takes precedence as in the release."""

    path: str
    start_s: float | None = None
    end_s: float | None = None
    end_frame: int | None = None


def frame_files(directory: Path) -> list[Path]:
    """The JPEG frames of a frame folder, in name order."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def _read_frame_dir(directory: Path, count: int, start_s, end_s, timeout_s) -> torch.Tensor:
    files = frame_files(directory)
    if not files:
        raise MediaError(directory, f"a frame folder with no {'/'.join(FRAME_SUFFIXES)} frames")
    indices = sample_frame_indices(len(files), FRAME_DIR_FPS, count, start_s, end_s)
    decoded = {i: decode_image(files[i], timeout_s=timeout_s) for i in dict.fromkeys(indices)}
    sizes = {tuple(f.shape) for f in decoded.values()}
    if len(sizes) > 1:
        raise MediaError(directory, f"frames of different sizes {sorted(sizes)}")
    return torch.stack([decoded[i] for i in indices])


def read_clip(clip: Clip, count: int, decoder: str = "auto", timeout_s: float | None = None) -> torch.Tensor:
    """uint8 [count, H, W, 3] RGB frames of `clip`. Raises MediaError for anything wrong with the video."""
    path = Path(clip.path)
    if path.is_dir():
        return _read_frame_dir(path, count, clip.start_s, clip.end_s, timeout_s)
    if path.suffix.lower() == ".gif":
        frames, _ = load_media_with_timeout(pyav_backend.read_gif, str(path), count, timeout_s=timeout_s)
        return torch.from_numpy(frames)
    choose_decoder(decoder)  # a bad decoder name is the caller's error, not this video's
    try:
        frames, _, _ = decode_video_sampled(path, count, clip.start_s, clip.end_s, decoder, timeout_s,
                                            end_frame=clip.end_frame)
    except MediaError:
        raise
    except ValueError as err:  # e.g. a stream the frame sampler cannot use: this video's problem
        raise MediaError(path, str(err)) from err
    return frames
