"""Frame sampling exactly as spec section 1."""

import numpy as np
import pytest

from merv_fast.data.frames import encoder_indices, sample_frame_indices


def test_whole_clip_is_linspace_truncated():
    got = sample_frame_indices(300, 30.0)
    assert got == [int(x) for x in np.linspace(0, 299, 32)]
    assert got[0] == 0 and got[-1] == 299 and len(got) == 32


def test_one_frame_video_repeats_index_zero():
    assert sample_frame_indices(1, 25.0) == [0] * 32


def test_short_clip_repeats_indices_in_order():
    got = sample_frame_indices(10, 30.0)
    assert len(got) == 32 and got == sorted(got) and set(got) == set(range(10))


def test_window_uses_start_and_end_seconds():
    # last = min(N-1, end*fps-1) = 2*30-1 = 59; first = 1*30 = 30
    assert sample_frame_indices(300, 30.0, start_s=1.0, end_s=2.0) == [int(x) for x in np.linspace(30, 59, 32)]
    # an end past the clip is clamped to the last frame
    assert sample_frame_indices(50, 30.0, end_s=100.0)[-1] == 49


def test_degenerate_windows_stay_inside_the_clip():
    assert set(sample_frame_indices(100, 10.0, start_s=50.0, end_s=60.0)) == {99}
    assert sample_frame_indices(100, 10.0, start_s=5.0, end_s=1.0) == [50] * 32
    assert sample_frame_indices(100, None, start_s=5.0, end_s=1.0) == sample_frame_indices(100, None)


def test_count_and_errors():
    assert len(sample_frame_indices(1000, 30.0, count=8)) == 8
    with pytest.raises(ValueError):
        sample_frame_indices(0, 30.0)


def test_encoder_stride():
    idx = list(range(100, 132))
    assert encoder_indices(idx, 16) == idx[0::2]
    assert encoder_indices(idx, 32) == idx
    assert encoder_indices(idx, 8) == idx[0::4]
    with pytest.raises(ValueError):
        encoder_indices(idx, 12)
