"""The MERV release's evaluation layout: one directory per benchmark holding `test_q.json`, `test_a.json` and
`videos/`. Followed from the release (princetonvisualai/merv: `eval_data/dummy_mcq`, `eval_data/dummy_openended`,
`scripts/eval_mcq.py`, `scripts/eval_openended.py`):

- `test_q.json`: a list of questions, each `{"question_id", "video_name", "question"}`; multiple choice adds
  `"options"` (list of strings) and `"num_option"` (eval_mcq.py:59-62).
- `test_a.json`: a list of `{"question_id", "answer"}`; multiple choice adds `"answer_id"` (index into options,
  eval_mcq.py:70). Every other key of both entries is kept for the prediction line (eval_mcq.py:161,
  eval_openended.py:180-182).
- Multiple choice only (eval_mcq.py:141-156): optional `"time": [start_s, end_s]` (a window of the video; TVQA's
  `[NaN, NaN]` means the whole video) and Perception Test's `"end_frame"` (frames 0..end_frame, which replaces the
  window; negative: unused). The open-ended script passes neither (eval_openended.py:170-178), so open-ended sets
  are read without them.
- `videos/{video_name}`: a directory of JPEG frames (VLEP; eval_mcq.py:136-137), else `videos/{video_name}.*`
  with any suffix (eval_mcq.py:139, eval_openended.py:167): .mp4, .mkv, .webm, .avi, .gif (TGIF-QA). A file named
  exactly `video_name` is taken first. How each is read: merv_fast/eval/videos.py.

The eight benchmarks differ only in what these keys hold (`BENCHMARKS` below). The benchmark's name is its
directory's name (the release's `eval_dataset`). A question type for the per-type accuracy comes from an optional
`"question_type"` key, else, for NExT-QA, from the id's prefix (`CW_...`; `TP` counted as `TN`), as the release's
NExT-QA breakdown does.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merv_fast.data.dataset import is_unsafe_relative
from merv_fast.data.decode import MediaError, resolve_media_path

QUESTIONS_FILE = "test_q.json"
ANSWERS_FILE = "test_a.json"
VIDEOS_DIR = "videos"
MAX_OPTIONS = 26  # option letters A..Z, each one token (the release asserts that for its tokenizer)


@dataclass(frozen=True)
class Benchmark:
    """What one of the release's benchmarks puts in the layout (EVALUATION.md: Video-LLaVA's open-ended sets,
    SeViLA's NExT-QA / VLEP / TVQA, Perception Test), as `merv-fast data synth --eval` writes it in small."""

    name: str
    task: str  # "mc" | "open"
    media: tuple[str, ...]  # how its videos come: file suffixes (".mp4", ".gif", ...) or "frames" (JPEG folders)
    options: int = 0  # multiple choice: options per question
    keys: tuple[str, ...] = ()  # the optional question keys it uses beyond the required ones


BENCHMARKS = (
    Benchmark("MSVD-QA", "open", (".avi",)),
    Benchmark("MSRVTT-QA", "open", (".mp4",)),
    Benchmark("TGIF-QA", "open", (".gif",)),
    Benchmark("ActivityNet-QA", "open", (".mp4", ".mkv", ".webm")),
    Benchmark("NExT-QA", "mc", (".mp4",), 5),  # question type in the id's prefix (CW_..., TN_...)
    Benchmark("VLEP", "mc", ("frames",), 2, ("time",)),
    Benchmark("TVQA", "mc", (".mp4",), 5, ("time",)),  # some windows are [NaN, NaN]
    Benchmark("Perception", "mc", (".mp4",), 3, ("end_frame",)),
)


class EvalSetError(ValueError):
    """An evaluation set that cannot be used; the message names the file, the entry and the key."""


@dataclass(frozen=True)
class EvalItem:
    benchmark: str
    question_id: str
    video_name: str
    question: str
    answer: Any
    options: tuple[str, ...] | None = None  # multiple choice only
    answer_id: int | None = None
    clip: tuple[float, float | None] | None = None  # (start_s, end_s); end None = to the end
    question_type: str | None = None
    record: dict | None = None  # the question and answer entries merged, as the release's prediction lines
    end_frame: int | None = None  # frames 0..end_frame (Perception Test), in place of `clip`

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.question_id}"


def _read_list(path: Path) -> list:
    if not path.is_file():
        raise EvalSetError(f"{path}: missing (an evaluation set holds {QUESTIONS_FILE}, {ANSWERS_FILE}, {VIDEOS_DIR}/)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalSetError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(data, list):
        raise EvalSetError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _question_id(path: Path, index: int, entry: Any) -> str:
    if not isinstance(entry, dict):
        raise EvalSetError(f"{path}: entry {index}: expected an object, got {type(entry).__name__}")
    qid = entry.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise EvalSetError(f"{path}: entry {index}: key 'question_id': expected a string or integer, got {qid!r}")
    return str(qid)


def _clip(where: str, value: Any) -> tuple[float, float | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise EvalSetError(f"{where}: key 'time': expected [start_s, end_s], got {value!r}")
    for v in value:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise EvalSetError(f"{where}: key 'time': expected numbers (or null), got {value!r}")
    start = 0.0 if value[0] is None or math.isnan(value[0]) else float(value[0])
    end = None if value[1] is None or math.isnan(value[1]) else float(value[1])
    if start < 0 or (end is not None and end <= start):
        raise EvalSetError(f"{where}: key 'time': need 0 <= start < end, got {value!r}")
    return start, end


def _end_frame(where: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value != int(value):
        raise EvalSetError(f"{where}: key 'end_frame': expected a frame number, got {value!r}")
    return int(value) if value >= 0 else None  # the release: a negative end_frame means the window decides


def _question_type(benchmark: str, qid: str, q: dict) -> str | None:
    if isinstance(q.get("question_type"), str):
        return q["question_type"]
    if "next-qa" in benchmark.lower() and "_" in qid:
        prefix = qid.split("_")[0]
        return "TN" if prefix == "TP" else prefix
    return None


def _item(benchmark: str, where: str, qid: str, q: dict, a: dict, task: str) -> EvalItem:
    for key in ("video_name", "question"):
        if not isinstance(q.get(key), str) or not q[key].strip():
            raise EvalSetError(f"{where}: key {key!r}: expected a non-empty string, got {q.get(key)!r}")
    unsafe = is_unsafe_relative(q["video_name"])
    if unsafe or "/" in q["video_name"].replace("\\", "/"):
        raise EvalSetError(f"{where}: key 'video_name': {unsafe or 'a name inside videos/, not a path'}")
    clip = end_frame = options = answer_id = None
    if task == "mc":
        clip = _clip(where, q["time"]) if "time" in q else None
        end_frame = _end_frame(where, q.get("end_frame"))
        options = q.get("options")
        if not isinstance(options, list) or not 2 <= len(options) <= MAX_OPTIONS or \
                not all(isinstance(o, str) for o in options):
            raise EvalSetError(f"{where}: key 'options': expected 2..{MAX_OPTIONS} strings, got {options!r}")
        if "num_option" in q and q["num_option"] != len(options):
            raise EvalSetError(f"{where}: key 'num_option' is {q['num_option']!r} but there are {len(options)} "
                               "options")
        answer_id = a.get("answer_id")
        if isinstance(answer_id, bool) or not isinstance(answer_id, int) or not 0 <= answer_id < len(options):
            raise EvalSetError(f"{where} ({ANSWERS_FILE}): key 'answer_id': expected an option index "
                               f"0..{len(options) - 1}, got {answer_id!r}")
        options = tuple(options)
    return EvalItem(benchmark, qid, q["video_name"], q["question"], a.get("answer"), options, answer_id, clip,
                    _question_type(benchmark, qid, q), {**q, **a}, end_frame)


def load_eval_set(directory: str | Path, task: str) -> list[EvalItem]:
    """Every question of one benchmark directory, in the file's order, validated (`task`: "mc" | "open")."""
    if task not in ("mc", "open"):
        raise ValueError(f"task must be 'mc' or 'open', got {task!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalSetError(f"{directory}: not a directory")
    benchmark = directory.resolve().name
    q_path, a_path = directory / QUESTIONS_FILE, directory / ANSWERS_FILE
    answers: dict[str, dict] = {}
    for index, entry in enumerate(_read_list(a_path)):
        answers[_question_id(a_path, index, entry)] = entry
    items, seen = [], set()
    for index, q in enumerate(_read_list(q_path)):
        qid = _question_id(q_path, index, q)
        where = f"{q_path}: entry {index} (question_id {qid!r})"
        if qid in seen:
            raise EvalSetError(f"{where}: duplicate question_id")
        seen.add(qid)
        if qid not in answers:
            raise EvalSetError(f"{where}: no answer with this question_id in {a_path}")
        items.append(_item(benchmark, where, qid, q, answers[qid], task))
    return items


def find_video(directory: str | Path, video_name: str) -> str:
    """The video's path relative to `directory`: `videos/{video_name}` when that file or frame folder exists, else
    the one `videos/{video_name}.*`. Raises MediaError (a broken video: reported and counted, not fatal); a path
    that resolves outside `directory` (a symlink) is refused the same way."""
    videos = Path(directory) / VIDEOS_DIR
    if (videos / video_name).is_file() or (videos / video_name).is_dir():
        name = video_name
    else:
        matches = sorted(p.name for p in videos.glob(f"{glob.escape(video_name)}.*") if p.is_file()) \
            if videos.is_dir() else []
        if not matches:
            raise MediaError(videos / video_name, f"no file {VIDEOS_DIR}/{video_name}[.*]")
        if len(matches) > 1:
            raise MediaError(videos / video_name, f"several files match {VIDEOS_DIR}/{video_name}.*: {matches}")
        name = matches[0]
    relative = f"{VIDEOS_DIR}/{name}"
    resolve_media_path(directory, relative)
    return relative
