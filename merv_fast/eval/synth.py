"""`merv-fast data synth --eval DIR`: evaluation sets in the release's layout (layout.py) with real encoded clips.

Three benchmark directories: `mcq` (multiple choice, 3 to 5 options), `NExT-QA-synth` (multiple choice whose ids
carry NExT-QA's question-type prefixes) and `openended`. Each has its own `videos/`, drawn from the training
synth's catalogue of odd-but-valid clips (merv_fast.data.synth); some questions ask about a `time` window of their
clip. Names are given without their suffix, as the release's sets do. The same seed writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from merv_fast.data.synth import ANSWERS, QUESTIONS, SUFFIX, video_catalogue, write_video
from merv_fast.eval.layout import ANSWERS_FILE, QUESTIONS_FILE, VIDEOS_DIR

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
            window = _time_window(rng, duration)
            if window is not None:
                q["time"] = window
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
