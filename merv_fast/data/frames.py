"""Which frames of a clip MERV looks at (spec section 1): 32 indices by linspace, then a stride per encoder."""

from __future__ import annotations

import numpy as np


def sample_frame_indices(num_frames: int, fps: float | None, count: int = 32, start_s: float | None = None,
                         end_s: float | None = None, end_frame: int | None = None) -> list[int]:
    """`linspace(first, last, count)` truncated to int, as the release: first = start*fps, last = min(N-1, end*fps-1).

    A window needs `fps`; without one the whole clip is used. Clips shorter than `count` frames repeat indices
    (a one-frame clip gives `count` zeros). A window that ends before it starts, or starts past the end, collapses
    onto its first frame rather than failing: the sample stays usable and the indices stay inside the clip.

    `end_frame` (Perception Test's key; None or negative: unused) replaces the window, as in the release's
    `load_video`: first = 0, last = min(N-1, end_frame), whatever the seconds say."""
    if num_frames < 1:
        raise ValueError(f"a clip with {num_frames} frames has nothing to sample")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    first, last = 0.0, float(num_frames - 1)
    if end_frame is not None and end_frame >= 0:
        return [int(i) for i in np.linspace(first, min(last, float(end_frame)), count)]
    if fps and start_s is not None:
        first = min(max(0.0, start_s * fps), num_frames - 1.0)
    if fps and end_s is not None:
        last = min(last, end_s * fps - 1)
    last = max(last, first)
    return [int(i) for i in np.linspace(first, last, count)]  # non-negative, so astype-int truncation == floor


def encoder_indices(indices: list[int], frames_for_encoder: int) -> list[int]:
    """Every (len(indices) / frames_for_encoder)-th index: a 16-frame encoder takes positions 0, 2, ..., 30 of 32."""
    if frames_for_encoder < 1 or len(indices) % frames_for_encoder:
        raise ValueError(f"{frames_for_encoder} frames per encoder do not divide the {len(indices)} sampled indices")
    return list(indices[:: len(indices) // frames_for_encoder])
