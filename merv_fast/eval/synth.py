"""`merv-fast data synth --eval DIR`: evaluation sets in the release's layout (layout.py) with real encoded clips.

`synthesize_eval`: three benchmark directories, `mcq` (multiple choice, 3 to 5 options), `NExT-QA-synth` (multiple
choice whose ids carry NExT-QA's question-type prefixes) and `openended`. Each has its own `videos/`, drawn from the
training synth's catalogue of odd-but-valid clips (merv_fast.data.synth); some multiple-choice questions ask about a
`time` window of their clip. Names are given without their suffix, as the release's sets do.
`synthesize_layouts`: DIR/layouts/<benchmark>, one small set per benchmark of layout.py's `BENCHMARKS`, each in its
real layout: AVI, MP4, GIF, MP4+MKV+WebM files, JPEG frame folders, `time` windows (TVQA's [NaN, NaN] included) and
Perception Test's `end_frame`. The same seed writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from merv_fast.data.synth import ANSWERS, QUESTIONS, SUFFIX, VideoSpec, moving_frames, video_catalogue, write_video
from merv_fast.eval.layout import ANSWERS_FILE, BENCHMARKS, QUESTIONS_FILE, VIDEOS_DIR, Benchmark

OPTIONS = ["a red square", "a blue circle", "nothing moves", "the camera pans left", "two people talk",
           "a dog runs", "it is raining", "the square grows", "the light flickers", "a car passes"]
NEXTQA_TYPES = ["CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO"]


def _write_videos(directory: Path, count: int, rng: random.Random, seed: int) -> list[tuple[str, float]]:
    """(name without suffix, duration in seconds) of each clip written into directory/videos."""
    (directory / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        catalogue = video_catalogue(rng)
        spec = catalogue[i % len(catalogue)]
        name = f"video_{i:04d}"
        suffix = SUFFIX.get(spec.name, ".webm" if spec.codec == "vp9" else ".mp4")
        write_video(directory / VIDEOS_DIR / f"{name}{suffix}", spec, seed=seed * 1000 + i)
        clips.append((name, spec.frames / spec.fps))
    return clips


def _time_window(rng: random.Random, duration: float) -> list[float] | None:
    if rng.random() < 0.6 or duration < 0.5:
        return None
    start = round(rng.uniform(0, duration / 2), 2)
    return [start, round(rng.uniform(start + 0.2, duration), 2)]


def _write_set(directory: Path, questions: list[dict], answers: list[dict]) -> None:
    (directory / QUESTIONS_FILE).write_text(json.dumps(questions, indent=1) + "\n")
    (directory / ANSWERS_FILE).write_text(json.dumps(answers, indent=1) + "\n")


def _mc_set(directory: Path, rng: random.Random, seed: int, videos: int, nextqa: bool) -> int:
    questions, answers = [], []
    for name, duration in _write_videos(directory, videos, rng, seed):
        for k in range(rng.randint(2, 5)):
            options = rng.sample(OPTIONS, rng.randint(3, 5))
            qid = f"{rng.choice(NEXTQA_TYPES)}_{name}_{k}" if nextqa else f"mcq_{name}_{k}"
            q = {"video_name": name, "num_option": len(options), "question_id": qid, "options": options,
                 "question": rng.choice(QUESTIONS).format(m="video")}
            window = _time_window(rng, duration)
            if window is not None:
                q["time"] = window
            answer_id = rng.randrange(len(options))
            questions.append(q)
            answers.append({"video_name": name, "question_id": qid, "answer_id": answer_id,
                            "answer": options[answer_id]})
    _write_set(directory, questions, answers)
    return len(questions)


def _open_set(directory: Path, rng: random.Random, seed: int, videos: int) -> int:
    questions, answers = [], []
    for name, duration in _write_videos(directory, videos, rng, seed):
        for _ in range(rng.randint(1, 4)):
            qid = str(len(questions))
            q = {"video_name": name, "question_id": qid, "question": rng.choice(QUESTIONS).format(m="video")}
            questions.append(q)
            answers.append({"question_id": qid, "answer": rng.choice(ANSWERS)})
    _write_set(directory, questions, answers)
    return len(questions)


def synthesize_eval(out: str | Path, videos: int = 6, seed: int = 0) -> dict[str, int]:
    """Write the three sets under `out`; returns {benchmark directory: number of questions}."""
    out = Path(out)
    rng = random.Random(seed)
    return {
        str(out / "mcq"): _mc_set(out / "mcq", rng, seed, videos, nextqa=False),
        str(out / "NExT-QA-synth"): _mc_set(out / "NExT-QA-synth", rng, seed + 1, videos, nextqa=True),
        str(out / "openended"): _open_set(out / "openended", rng, seed + 2, videos),
    }


# ------------------------------------------------------------------------------------------------ one set per layout
CODEC_OF = {".mp4": "h264", ".mkv": "h264", ".avi": "mjpeg", ".webm": "vp9"}
LAYOUT_VIDEOS = 2  # per benchmark


def write_gif(path: Path, width: int, height: int, frames: int, seed: int) -> Path:
    """An animated GIF of `moving_frames` (TGIF-QA's format), written by Pillow; 100 ms per frame."""
    from PIL import Image

    images = [Image.fromarray(f) for f in moving_frames(width, height, frames, seed=seed)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def write_frame_folder(directory: Path, width: int, height: int, frames: int, seed: int) -> Path:
    """A folder of JPEG frames named in frame order (VLEP's layout, 3 frames per second)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(moving_frames(width, height, frames, seed=seed)):
        Image.fromarray(frame).save(directory / f"{i + 1:05d}.jpg", quality=92)
    return directory


def _layout_videos(directory: Path, bench: Benchmark, rng: random.Random, seed: int) -> list[tuple[str, float, int]]:
    """(video name, duration in seconds, frames) of each video written into directory/videos in `bench`'s layout."""
    videos = directory / VIDEOS_DIR
    videos.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(max(LAYOUT_VIDEOS, len(bench.media))):
        name, frames = f"{bench.name.lower()}_{i:03d}", rng.randint(36, 60)
        width, height = 64 + 2 * rng.randint(0, 8), 48 + 2 * rng.randint(0, 8)
        media = bench.media[i % len(bench.media)]
        if media == "frames":
            write_frame_folder(videos / name, width, height, frames, seed * 1000 + i)
            out.append((name, frames / 3.0, frames))
        elif media == ".gif":
            write_gif(videos / f"{name}.gif", width, height, frames, seed * 1000 + i)
            out.append((name, frames / 10.0, frames))
        else:
            spec = VideoSpec(name, CODEC_OF[media], width, height, frames, fps=15)
            write_video(videos / f"{name}{media}", spec, seed=seed * 1000 + i)
            out.append((name, frames / 15.0, frames))
    return out


def _layout_set(directory: Path, bench: Benchmark, rng: random.Random, seed: int) -> int:
    questions, answers = [], []
    for name, duration, frames in _layout_videos(directory, bench, rng, seed):
        for k in range(3):
            qid = f"{rng.choice(NEXTQA_TYPES)}_{name}_{k}" if bench.name == "NExT-QA" else f"{name}_{k}"
            q = {"video_name": name, "question_id": qid, "question": rng.choice(QUESTIONS).format(m="video")}
            a = {"question_id": qid, "answer": rng.choice(ANSWERS)}
            if bench.task == "mc":
                options = rng.sample(OPTIONS, bench.options)
                answer_id = rng.randrange(len(options))
                q.update(num_option=len(options), options=options)
                a.update(video_name=name, answer_id=answer_id, answer=options[answer_id])
            if "time" in bench.keys:  # TVQA's test set holds one [NaN, NaN] window: the whole video
                q["time"] = [float("nan"), float("nan")] if k == 2 else \
                    [round(k * duration / 4, 2), round(duration * (2 + k) / 4, 2)]
            if "end_frame" in bench.keys:  # before the last frame, and past it (the release clamps)
                q["end_frame"] = frames // 2 if k != 1 else frames + 40
            questions.append(q)
            answers.append(a)
    _write_set(directory, questions, answers)
    return len(questions)


def synthesize_layouts(out: str | Path, seed: int = 0) -> dict[str, int]:
    """Write OUT/layouts/<benchmark> for every benchmark of layout.py's `BENCHMARKS`; returns {directory: number of
    questions}."""
    root = Path(out) / "layouts"
    rng = random.Random(seed + 10)
    return {str(root / b.name): _layout_set(root / b.name, b, rng, seed + 10 + i) for i, b in enumerate(BENCHMARKS)}
