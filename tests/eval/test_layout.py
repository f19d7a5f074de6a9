"""The release's evaluation layout: entries validated with the file/entry/key named, videos found inside the set,
clip windows honoured, and the release's multiple-choice prompt character for character."""

import json

import pytest
import torch

from merv_fast.data.decode import MediaError, decode_video, probe_video
from merv_fast.data.frames import sample_frame_indices
from merv_fast.eval.layout import EvalSetError, find_video, load_eval_set
from merv_fast.eval.videos import Clip, read_clip
from merv_fast.eval.prompts import mc_message, prompt_for, release_choice, release_correct

GOOD_Q = {"video_name": "v", "num_option": 3, "question_id": "q0", "options": ["x", "y", "z"], "question": "Why?"}
GOOD_A = {"video_name": "v", "question_id": "q0", "answer_id": 1, "answer": "y"}


def write_set(root, questions, answers):
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_q.json").write_text(json.dumps(questions))
    (root / "test_a.json").write_text(json.dumps(answers))
    return root


@pytest.mark.parametrize("change,answer_change,message", [
    ({"options": "x"}, {}, "entry 0 (question_id 'q0'): key 'options'"),
    ({"num_option": 4}, {}, "key 'num_option' is 4 but there are 3 options"),
    ({}, {"answer_id": 3}, "key 'answer_id': expected an option index 0..2"),
    ({"video_name": "../escape"}, {}, "key 'video_name'"),
    ({"video_name": "sub/v"}, {}, "key 'video_name': a name inside videos/"),
    ({"question": ""}, {}, "key 'question'"),
    ({"time": [5, 2]}, {}, "key 'time'"),
    ({"question_id": True}, {}, "entry 0: key 'question_id'"),
    ({"end_frame": "595"}, {}, "key 'end_frame': expected a frame number"),
    ({"end_frame": 1.5}, {}, "key 'end_frame'"),
])
def test_bad_entries_are_named(tmp_path, change, answer_change, message):
    root = write_set(tmp_path / "bench", [{**GOOD_Q, **change}], [{**GOOD_A, **answer_change}])
    with pytest.raises(EvalSetError, match="test_q.json|test_a.json") as info:
        load_eval_set(root, "mc")
    assert message in str(info.value)


def test_missing_answer_duplicate_id_and_missing_files(tmp_path):
    with pytest.raises(EvalSetError, match="no answer with this question_id"):
        load_eval_set(write_set(tmp_path / "a", [GOOD_Q], [{**GOOD_A, "question_id": "other"}]), "mc")
    with pytest.raises(EvalSetError, match="duplicate question_id"):
        load_eval_set(write_set(tmp_path / "b", [GOOD_Q, GOOD_Q], [GOOD_A]), "mc")
    (tmp_path / "c").mkdir()
    with pytest.raises(EvalSetError, match="test_a.json: missing"):
        load_eval_set(tmp_path / "c", "mc")
    item = load_eval_set(write_set(tmp_path / "d", [{**GOOD_Q, "time": [1, None]}], [GOOD_A]), "mc")[0]
    assert (item.benchmark, item.key, item.clip, item.options, item.answer_id) == ("d", "d/q0", (1.0, None),
                                                                                   ("x", "y", "z"), 1)


def test_window_keys_are_read_as_each_release_script_reads_them(tmp_path):
    """eval_mcq.py passes `time` and `end_frame` (a negative one means unused); eval_openended.py passes neither."""
    q = {**GOOD_Q, "time": [1, 3], "end_frame": 595}
    mc = load_eval_set(write_set(tmp_path / "mc", [q, {**q, "question_id": "q1", "end_frame": -1}],
                                 [GOOD_A, {**GOOD_A, "question_id": "q1"}]), "mc")
    assert [(i.clip, i.end_frame) for i in mc] == [((1.0, 3.0), 595), ((1.0, 3.0), None)]
    opened = load_eval_set(write_set(tmp_path / "open", [q], [{"question_id": "q0", "answer": "y"}]), "open")[0]
    assert (opened.clip, opened.end_frame) == (None, None) and opened.record["end_frame"] == 595  # kept for the line


def test_videos_are_found_by_name_inside_the_set(tmp_path):
    root = write_set(tmp_path / "bench", [GOOD_Q], [GOOD_A])
    (root / "videos").mkdir()
    with pytest.raises(MediaError, match="no file videos/v"):
        find_video(root, "v")
    (root / "videos" / "v.mp4").write_bytes(b"x")
    assert find_video(root, "v") == "videos/v.mp4"
    (root / "videos" / "v.webm").write_bytes(b"x")
    with pytest.raises(MediaError, match="several files"):
        find_video(root, "v")
    (root / "videos" / "exact.mkv").write_bytes(b"x")  # VLEP's names carry their suffix
    assert find_video(root, "exact.mkv") == "videos/exact.mkv"
    (root / "videos" / "frames").mkdir()  # a frame folder, taken before any `frames.*` file (eval_mcq.py:136)
    (root / "videos" / "frames.mp4").write_bytes(b"x")
    assert find_video(root, "frames") == "videos/frames"
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"x")
    (root / "videos" / "link.mp4").symlink_to(outside)
    with pytest.raises(MediaError, match="outside the media root"):
        find_video(root, "link")


def test_clip_window_picks_the_spec_frames(eval_sets):
    root = eval_sets["mcq"]
    item = next(i for i in load_eval_set(root, "mc") if i.clip is not None)
    relative = find_video(root, item.video_name)
    info = probe_video(f"{root}/{relative}")
    expected = sample_frame_indices(info.num_frames, info.fps, 16, *item.clip)
    assert expected != sample_frame_indices(info.num_frames, info.fps, 16)
    frames = read_clip(Clip(f"{root}/{relative}", *item.clip), 16)
    assert torch.equal(frames, decode_video(f"{root}/{relative}", expected))


def test_release_mc_prompt_and_first_character_scoring(tmp_path):
    message = mc_message("Why?", ["x", "y", "z", "w"])
    assert message == ("Why? Select the correct answer from the following options. Write your answer as only one "
                       "of A, B, C, D and nothing else.\n\n    A. x\nB. y\nC. z\nD. w")
    item = load_eval_set(write_set(tmp_path / "bench", [GOOD_Q], [GOOD_A]), "mc")[0]  # the answer is B
    assert prompt_for(item, "llama2-base") == f"In: {mc_message('Why?', ['x', 'y', 'z'])}\nOut:"
    # The release reads the first character of the lower-cased answer: any word starting with b counts as B.
    assert [release_correct(p, item) for p in ["B", "b) y", "Because the dog ran.", "A", "y", "", " B"]] == \
        [True, True, True, False, False, False, False]
    assert release_choice("Because") == "b"
