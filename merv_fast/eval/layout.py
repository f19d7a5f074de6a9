"""The MERV release's evaluation layout: one directory per benchmark holding `test_q.json`, `test_a.json` and
`videos/`. Followed from the release (princetonvisualai/merv: `eval_data/dummy_mcq`, `eval_data/dummy_openended`,
`scripts/eval_mcq.py`, `scripts/eval_openended.py`):

- `test_q.json`: a list of questions, each `{"question_id", "video_name", "question"}`; multiple choice adds
  `"options"` (list of strings) and `"num_option"`; optional `"time": [start_s, end_s]` (a clip of the video, the
  release's `clip_start_sec` / `clip_end_sec`). Other keys (e.g. Perception Test's `end_frame`, which the release's
  MC script never passes on) are kept for the prediction file and otherwise ignored.
- `test_a.json`: a list of `{"question_id", "answer"}`; multiple choice adds `"answer_id"` (index into options).
- `videos/{video_name}.*`: the release globs for the name with any suffix (VLEP's names carry their suffix: an
  exact match is taken first).

The benchmark's name is its directory's name (the release's `eval_dataset`). A question type for the per-type
accuracy comes from an optional `"question_type"` key, else, for NExT-QA, from the id's prefix (`CW_...`; `TP`
counted as `TN`), as the release's NExT-QA breakdown does.
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
    clip = _clip(where, q["time"]) if "time" in q else None
    options = answer_id = None
    if task == "mc":
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
                    _question_type(benchmark, qid, q), {**q, **a})


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
    """The video's path relative to `directory`: `videos/{video_name}` when that file exists, else the one
    `videos/{video_name}.*`. Raises MediaError (a broken video: reported and counted, not fatal); a path that
    resolves outside `directory` (a symlink) is refused the same way."""
    videos = Path(directory) / VIDEOS_DIR
    if (videos / video_name).is_file():
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
