"""Each benchmark layout read as the release reads it: JPEG frame folders in name order at 3 fps, GIFs over all their
frames, Perception Test's end_frame in place of the window; then every layout and the release's own sample sets
through `merv-fast eval` as they are."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from merv_fast.cli import main
from merv_fast.data.decode import MediaError, decode_image, decode_video, probe_video
from merv_fast.data.frames import sample_frame_indices
from merv_fast.data.synth import VideoSpec, write_video
from merv_fast.eval.layout import BENCHMARKS, find_video, load_eval_set
from merv_fast.eval.runner import EvalSettings, run_eval
from merv_fast.eval.synth import synthesize_layouts, write_frame_folder, write_gif
from merv_fast.eval.videos import Clip, read_clip


def test_frame_folder_in_name_order_at_three_fps(tmp_path):
    folder = write_frame_folder(tmp_path / "clip", 48, 32, 40, seed=1)
    (folder / "notes.txt").write_text("not a frame")
    files = sorted(folder.glob("*.jpg"))
    for window in [(None, None), (2.0, 8.0), (4.0, None)]:
        expected = sample_frame_indices(40, 3.0, 16, *window)
        frames = read_clip(Clip(str(folder), *window), 16)
        assert torch.equal(frames, torch.stack([decode_image(files[i]) for i in expected])), window
    assert sample_frame_indices(40, 3.0, 16, 2.0, 8.0)[0] == 6  # seconds count at 3 frames per second
    with pytest.raises(MediaError, match="no .jpg/.jpeg frames"):
        read_clip(Clip(str(tmp_path)), 16)


def test_gif_takes_every_frame_and_no_window(tmp_path):
    path = write_gif(tmp_path / "a.gif", 40, 30, 21, seed=2)
    with Image.open(path) as image:
        every = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(image)]  # the release's reading
    wanted = [int(i) for i in np.linspace(0, 20, 16)]
    frames = read_clip(Clip(str(path), 0.5, 1.0), 16)  # a window does not apply to a GIF (datasets.py:116-122)
    assert torch.equal(frames, torch.from_numpy(np.stack([every[i] for i in wanted])))
    (tmp_path / "cut.gif").write_bytes(path.read_bytes()[:200])
    with pytest.raises(MediaError, match="GIF"):
        read_clip(Clip(str(tmp_path / "cut.gif")), 16)


def test_end_frame_replaces_the_window(tmp_path):
    path = write_video(tmp_path / "p.mp4", VideoSpec("p", "h264", 64, 48, 60, fps=15))
    info = probe_video(path)
    for end_frame, expected in [(30, np.linspace(0, 30, 16)), (500, np.linspace(0, 59, 16)),
                                (-1, sample_frame_indices(info.num_frames, info.fps, 16, 1.0, 2.0))]:
        frames = read_clip(Clip(str(path), 1.0, 2.0, end_frame), 16)
        assert torch.equal(frames, decode_video(path, [int(i) for i in expected])), end_frame


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return synthesize_layouts(tmp_path_factory.mktemp("layouts"), seed=0)


def test_every_benchmark_layout_reads(layouts):
    """`data synth --eval`'s set per benchmark: every question's video found and read in its layout."""
    assert sorted(Path(d).name for d in layouts) == sorted(b.name for b in BENCHMARKS)
    media, windows = set(), {}
    for bench in BENCHMARKS:
        root = next(d for d in layouts if Path(d).name == bench.name)
        items = load_eval_set(root, bench.task)
        assert len(items) == layouts[root]
        for item in items:
            path = Path(root) / find_video(root, item.video_name)
            media.add("frames" if path.is_dir() else path.suffix)
            start, end = item.clip or (None, None)
            assert read_clip(Clip(str(path), start, end, item.end_frame), 8).shape[0] == 8
            windows.setdefault(bench.name, set()).add((item.clip is not None, item.end_frame is not None))
    assert media == {".avi", ".mp4", ".gif", ".mkv", ".webm", "frames"}
    assert windows["VLEP"] == windows["TVQA"] == {(True, False)} and windows["Perception"] == {(False, True)}
    assert windows["MSVD-QA"] == {(False, False)}


def test_layouts_run_through_eval(layouts, answering, rambling, tmp_path):
    """Frame folders, time windows and end_frame (multiple choice), GIFs (open-ended) through `merv-fast eval`."""
    sets = {Path(d).name: d for d in layouts}
    for task, names, (model, tokenizer) in (("mc", ["VLEP", "Perception"], answering),
                                            ("open", ["TGIF-QA"], rambling)):
        metrics = run_eval(EvalSettings(task, [sets[n] for n in names], str(tmp_path / task), batch_size=8,
                                        max_new_tokens=3, show_progress=False), model, tokenizer)
        assert metrics["answered"] == metrics["questions"] == sum(layouts[sets[n]] for n in names)
        assert metrics["broken"]["videos"] == 0
    rows = [json.loads(line) for line in (tmp_path / "mc" / "Perception_naive_pred_merge.jsonl")
            .read_text().splitlines()]
    assert all("end_frame" in r for r in rows)  # the question's keys stay on its prediction line


def test_release_sample_sets_run_as_they_are(tmp_path, capsys):
    """eval_data/dummy_mcq and dummy_openended as the release ships them (the same JSON structure, Perception Test
    style; a synthesized mp4 under the same name), through the CLI unchanged."""
    for name in ("dummy_mcq", "dummy_openended"):
        (tmp_path / name / "videos").mkdir(parents=True)
        write_video(tmp_path / name / "videos" / "video_10336.mp4", VideoSpec("v", "h264", 96, 64, 90, fps=30))
    options = [["moving", "I don't know", "static"], ["3", "4", "2"], ["yes", "no", "I can't tell"]]
    mcq_q = [{"video_name": "video_10336", "num_option": 3, "question_id": f"mcvqa_10336_{i}", "options": o,
              "question": f"Question {i} about the objects?", "end_frame": 59} for i, o in enumerate(options)]
    mcq_a = [{"video_name": "video_10336", "question_id": f"mcvqa_10336_{i}", "answer_id": i % 3,
              "answer": o[i % 3]} for i, o in enumerate(options)]
    open_q = [{"video_name": "video_10336", "question_id": str(i), "question": f"what is a person doing {i}?"}
              for i in range(3)]
    open_a = [{"question_id": str(i), "answer": "show"} for i in range(3)]
    for name, q, a in (("dummy_mcq", mcq_q, mcq_a), ("dummy_openended", open_q, open_a)):
        (tmp_path / name / "test_q.json").write_text(json.dumps(q))
        (tmp_path / name / "test_a.json").write_text(json.dumps(a))
    for task, name in (("mc", "dummy_mcq"), ("open", "dummy_openended")):
        out = tmp_path / f"out_{task}"
        assert main(["eval", "--task", task, "--data", str(tmp_path / name), "--out", str(out),
                     "--max-new-tokens", "3"]) == 0
        assert "3 of 3 questions answered" in capsys.readouterr().out
    lines = (tmp_path / "out_open" / "dummy_openended_pred_merge.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == ["0", "1", "2"]
