"""LLaVA / Video-LLaVA style JSON datasets: validated entries, tokenised samples, deterministic bad-sample handling.

The JSON is a list of `{"id", "image" | "video" (a path relative to the media root), "conversations": [{"from":
"human" | "gpt", "value": str}, ...]}`; an entry with neither media key is text-only. A video entry may carry the
release's clip window, `"time": [start_s, end_s]` (the key the release's evaluation reads; NaN start means 0, NaN or
null end means the end of the video, as the release's `load_video` treats them). The release's training loader never
passed a window, so a window only changes anything for data that has one.

Determinism (issue 4, item 2): every random choice here, the LanguageBind flip and a broken sample's replacement, is
a pure function of (seed, epoch, sample index[, attempt]) through `counter_hash`; no RNG state is kept, so the result
is the same whatever the worker count, the iteration order, or which samples a worker happened to load before.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

from merv_fast.data.prompts import tokenize_caption, tokenize_conversation, validate_conversation

log = logging.getLogger("merv_fast.data")

ROLES = ("human", "gpt")
KINDS = ("video", "image", "text")
FRAMES_SAMPLED = 32  # spec section 1: 32 indices per video

# Stream tags keep the flip and the replacement draws independent even for equal (seed, epoch, index).
_STREAM_FLIP = 1
_STREAM_REPLACE = 2
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_hash(*keys: int) -> int:
    """A 64-bit hash of a tuple of integers (splitmix64 chained over the keys): a counter-based random number.

    Chaining (rather than adding the keys) keeps (seed=0, epoch=1) and (seed=1, epoch=0) apart."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h


class DatasetError(ValueError):
    """A dataset that cannot be used: invalid entries (all of them listed in `.problems`) or a sample that could
    not be replaced after the bounded number of attempts."""

    def __init__(self, message: str, problems: Sequence["EntryProblem"] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class EntryProblem:
    """One invalid JSON entry: where (index, id, key) and why."""

    index: int | None  # None: the file itself (unreadable, not JSON, not a list)
    id: str | None
    key: str | None  # e.g. "conversations[2].from"
    reason: str

    def __str__(self) -> str:
        where = "file" if self.index is None else f"entry {self.index} (id {self.id!r})"
        return f"{where}: {self.key + ': ' if self.key else ''}{self.reason}"


@dataclass(frozen=True)
class Entry:
    index: int  # position in the JSON list
    id: str
    kind: str  # "video" | "image" | "text"
    media: str | None  # path relative to the media root
    conversations: list[dict]
    clip: tuple[float, float | None] | None = None  # (start_s, end_s); end None = to the end of the video

    def num_words(self) -> int:
        """The release's length estimate (`get_modality_lengths`): whitespace-split words over all turns."""
        return sum(len(turn["value"].split()) for turn in self.conversations)


@dataclass
class BadSample:
    """A sample whose media failed to load, and what replaced it (None: the attempts ran out)."""

    index: int  # dataset position that failed
    id: str
    path: str
    reason: str
    epoch: int
    requested: int  # the dataset position originally asked for
    attempt: int  # 0 = the requested sample itself
    replacement: int | None = None


@dataclass
class Sample:
    index: int  # dataset position actually loaded (differs from `requested` after a replacement)
    id: str
    kind: str
    frames: Any  # uint8 numpy/torch [32, H, W, 3] (video) | [1, H, W, 3] (image) | None (text)
    input_ids: list[int]
    labels: list[int]
    flip: bool
    requested: int = -1
    bad_samples: list[BadSample] = field(default_factory=list)  # failures met on the way (travel with the batch)


def is_unsafe_relative(path: str) -> str | None:
    """Why `path` may not be used as a path under the media root (None when it is fine). Lexical, so it also
    holds before the media root exists; `resolve_media_path` additionally catches symlink escapes."""
    if path.strip() == "":
        return "empty media path"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        return f"absolute media path {path!r} (must be relative to the media root)"
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if ".." in parts:
        return f"media path {path!r} contains '..' (would leave the media root)"
    return None


def _as_clip(value: Any) -> tuple[float, float | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected [start_s, end_s], got {value!r}")
    start, end = value
    for v in (start, end):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"expected numbers (or null), got {value!r}")
    start = 0.0 if start is None or math.isnan(start) else float(start)  # the release: NaN start -> 0
    end = None if end is None or math.isnan(end) else float(end)  # the release: NaN end -> whole video
    if start < 0:
        raise ValueError(f"start {start} s is negative")
    if end is not None and end <= start:
        raise ValueError(f"end {end} s is not after start {start} s")
    return (start, end)


def _entry_problems(index: int, raw: Any) -> tuple[Entry | None, list[EntryProblem]]:
    """Validate one raw JSON entry: the Entry, or every problem found (all of them, not just the first)."""
    if not isinstance(raw, dict):
        return None, [EntryProblem(index, None, None, f"entry must be an object, got {type(raw).__name__}")]
    problems: list[EntryProblem] = []
    raw_id = raw.get("id")
    entry_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None

    def bad(key: str | None, reason: str) -> None:
        problems.append(EntryProblem(index, entry_id, key, reason))

    if "id" not in raw:
        bad("id", "missing key")
    elif entry_id is None:
        bad("id", f"must be a string or an integer, got {type(raw_id).__name__}")

    media_keys = [k for k in ("video", "image") if k in raw]
    kind, media = "text", None
    if len(media_keys) == 2:
        bad("image", "an entry has one medium: both 'image' and 'video' are set")
    elif media_keys:
        kind = media_keys[0]
        media = raw[kind]
        if not isinstance(media, str):
            bad(kind, f"must be a string path, got {type(media).__name__}")
            media = None
        elif (why := is_unsafe_relative(media)) is not None:
            bad(kind, why)

    clip = None
    if "time" in raw and raw["time"] is not None:
        if kind != "video":
            bad("time", "a clip window is only valid on a video entry")
        else:
            try:
                clip = _as_clip(raw["time"])
            except ValueError as err:
                bad("time", str(err))

    conv = raw.get("conversations")
    if "conversations" not in raw:
        bad("conversations", "missing key")
    elif not isinstance(conv, list):
        bad("conversations", f"must be a list of turns, got {type(conv).__name__}")
    elif not conv:
        bad("conversations", "empty conversation")
    else:
        shape_ok = True
        for t, turn in enumerate(conv):
            key = f"conversations[{t}]"
            if not isinstance(turn, dict):
                bad(key, f"turn must be an object, got {type(turn).__name__}")
                shape_ok = False
                continue
            for sub in ("from", "value"):
                if sub not in turn:
                    bad(f"{key}.{sub}", "missing key")
                    shape_ok = False
            if "from" in turn and turn["from"] not in ROLES:
                bad(f"{key}.from", f"unknown role {turn['from']!r} (expected one of {list(ROLES)})")
                shape_ok = False
            if "value" in turn and not isinstance(turn["value"], str):
                bad(f"{key}.value", f"must be a string, got {type(turn['value']).__name__}")
                shape_ok = False
        if shape_ok:
            try:
                validate_conversation(conv)  # alternation human/gpt, starting with human (the prompt code's rule)
            except ValueError as err:
                bad("conversations", str(err))

    if problems:
        return None, problems
    return Entry(index, entry_id, kind, media, conv, clip), []


def parse_entries(data: Any) -> tuple[list[Entry], list[EntryProblem]]:
    """Validate a loaded JSON document: (valid entries, problems of the invalid ones). Never raises."""
    if not isinstance(data, list):
        return [], [EntryProblem(None, None, None, f"the JSON document must be a list of entries, "
                                                   f"got {type(data).__name__}")]
    entries, problems = [], []
    for index, raw in enumerate(data):
        entry, found = _entry_problems(index, raw)
        if entry is not None:
            entries.append(entry)
        problems.extend(found)
    return entries, problems


# What a sample supervises: the whole conversation's gpt turns (the release's FinetuneVideoDataset), or only the
# caption, `{caption}</s>` without human turn or prompt (its AlignVideoDataset: the align stages' data).
OBJECTIVES = ("conversations", "captions")


def caption_problems(entries: Sequence[Entry]) -> list[EntryProblem]:
    """Entries that cannot be align-stage (caption) samples: the release asserts exactly two turns and a caption
    without an `<image>`/`<video>` tag."""
    problems = []
    for e in entries:
        if len(e.conversations) != 2:
            problems.append(EntryProblem(e.index, e.id, "conversations", f"a caption (align-stage) entry has exactly "
                                                                         f"2 turns, got {len(e.conversations)}"))
        elif "<image>" in e.conversations[1]["value"] or "<video>" in e.conversations[1]["value"]:
            problems.append(EntryProblem(e.index, e.id, "conversations[1].value",
                                         "a caption must not contain <image> or <video>"))
    return problems


def read_json(json_path: str | Path) -> tuple[Any, EntryProblem | None]:
    """The JSON document, or a file-level problem (missing, unreadable, not JSON)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, EntryProblem(None, None, None, f"{json_path}: no such file")
    except (OSError, UnicodeDecodeError) as err:
        return None, EntryProblem(None, None, None, f"{json_path}: cannot read: {err}")
    except json.JSONDecodeError as err:
        return None, EntryProblem(None, None, None, f"{json_path}: not valid JSON: {err}")


def format_problems(problems: Sequence[EntryProblem], limit: int = 20) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more (run `merv-fast data check` for the full list)")
    return "\n".join(lines)


def load_entries(json_path: str | Path, on_invalid: str = "error") -> list[Entry]:
    """Every entry of a LLaVA-format JSON file, validated.

    on_invalid="error" raises DatasetError naming each bad entry (index, id, key, reason); "skip" logs and drops the
    invalid entries (the valid ones keep their JSON `index`)."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    data, file_problem = read_json(json_path)
    if file_problem is not None:
        raise DatasetError(str(file_problem), [file_problem])
    entries, problems = parse_entries(data)
    if problems and (on_invalid == "error" or any(p.index is None for p in problems)):
        raise DatasetError(f"{json_path}: {len(problems)} problem(s) in the dataset:\n{format_problems(problems)}",
                           problems)
    for p in problems:
        log.warning("skipping invalid entry: %s", p)
    return entries


def load_media(entry: Entry, media_root: str | Path, decoder: str = "auto", timeout_s: float | None = None,
               frames: int = FRAMES_SAMPLED):
    """The entry's decoded frames: uint8 [frames, H, W, 3] for a video (the clip window honoured), [1, H, W, 3] for
    an image (handed on as one frame; tiling happens where the spec says it is exact), None for text.
    Raises MediaError for anything wrong with the file."""
    from merv_fast.data.decode import (MediaError, choose_decoder, decode_image, decode_video_sampled,
                                       resolve_media_path)

    if entry.kind == "text":
        return None
    path = resolve_media_path(media_root, entry.media)
    if entry.kind == "image":
        return decode_image(path, timeout_s=timeout_s)[None]
    choose_decoder(decoder)  # a bad decoder name is the caller's error, not this sample's: let it raise as is
    start, end = entry.clip if entry.clip is not None else (None, None)
    try:
        # One call (one round trip to the timed decode worker): probe, the spec's 32 indices, decode them.
        video, _, info = decode_video_sampled(path, count=frames, start_s=start, end_s=end, decoder=decoder,
                                              timeout_s=timeout_s)
    except MediaError:
        raise
    except ValueError as err:  # e.g. a stream the frame sampler cannot use: this sample's problem
        raise MediaError(path, str(err)) from err
    for warning in info.warnings:  # odd but valid: every sampled frame decoded
        log.warning("%s: %s; kept (every sampled frame decodes)", path, warning, extra={"media_warning": warning})
    return video


def check_media_root(entries: Sequence[Entry], media_root: str | Path, probe: int = 64) -> None:
    """Stop before training when the media root is evidently wrong: of up to `probe` media entries spread evenly
    over the dataset, most name files that do not exist. A few missing files are bad samples (logged, counted,
    replaced); most of them missing is a wrong --media-root, better said once than as a flood of bad samples."""
    from merv_fast.data.decode import MediaError, resolve_media_path

    media = [e for e in entries if e.kind != "text"]
    if not media:
        return
    picked = [media[i * len(media) // min(probe, len(media))] for i in range(min(probe, len(media)))]
    missing = []
    for entry in picked:
        try:
            path = resolve_media_path(media_root, entry.media)
        except MediaError:
            continue  # outside the root: that entry's own problem, reported per sample
        if not path.exists():
            missing.append((entry, path))
    if len(missing) * 2 > len(picked):
        entry, path = missing[0]
        raise DatasetError(f"media root {str(media_root)!r} looks wrong: {len(missing)} of {len(picked)} media files "
                           f"checked do not exist (e.g. {str(path)!r} for entry {entry.index}, id {entry.id!r}); "
                           f"--media-root is the folder the dataset's media paths are relative to")


class VideoLLaVADataset:
    """Map-style dataset over validated entries: `dataset[i]` is a tokenised `Sample` with its decoded frames.

    A sample whose media fails (MediaError) is logged (path and reason), recorded in `bad_samples` and on the returned
    Sample (so that counts survive DataLoader worker processes), and replaced by another sample of the same kind
    chosen by `counter_hash(seed, epoch, index, attempt)`: the same replacement on every run with the same seed.
    After `max_attempts` failed replacements it raises DatasetError. (The release retried with `np.random.randint`
    over the whole dataset, any modality: neither reproducible nor modality-preserving.)
    """

    def __init__(self, entries: Sequence[Entry] | str | Path, media_root: str | Path, tokenizer,
                 prompt_format: str = "llama2-base", max_length: int = 2048, seed: int = 0,
                 frames: int = FRAMES_SAMPLED, random_flip: bool = True, decoder: str = "auto",
                 timeout_s: float | None = None, max_attempts: int = 8, release_quirks: bool = True,
                 objective: str = "conversations"):
        self.entries = load_entries(entries) if isinstance(entries, (str, Path)) else list(entries)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; choose one of {list(OBJECTIVES)}")
        self.objective = objective
        if objective == "captions" and (problems := caption_problems(self.entries)):
            raise DatasetError(f"{len(problems)} entries cannot be caption samples:\n{format_problems(problems)}",
                               problems)
        self.media_root = Path(media_root)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0
        self.frames = frames
        self.random_flip = random_flip
        self.decoder = decoder
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.release_quirks = release_quirks
        self.bad_samples: list[BadSample] = []
        # Replacement pools: positions of each kind, so that a replacement keeps the batch single-modality.
        self._pools = {kind: [i for i, e in enumerate(self.entries) if e.kind == kind] for kind in KINDS}

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -------------------------------------------------------------------------------- deterministic choices
    def flip_for(self, index: int, epoch: int | None = None) -> bool:
        """LanguageBind's horizontal flip (p = 0.5) for the sample at `index`: a function of (seed, epoch, index)."""
        if not self.random_flip:
            return False
        epoch = self.epoch if epoch is None else epoch
        return bool(counter_hash(self.seed, epoch, index, _STREAM_FLIP) & 1)

    def replacement_for(self, index: int, attempt: int, epoch: int | None = None) -> int:
        """The position tried at `attempt` (1, 2, ...) when the sample at `index` is broken: another entry of the same
        kind, a function of (seed, epoch, index, attempt) only."""
        epoch = self.epoch if epoch is None else epoch
        pool = self._pools[self.entries[index].kind]
        if len(pool) < 2:
            raise DatasetError(f"entry {self.entries[index].index} (id {self.entries[index].id!r}) is broken and "
                               f"there is no other {self.entries[index].kind} entry to replace it")
        # Draw among the pool without the failing sample itself, so that no attempt is wasted on it.
        k = counter_hash(self.seed, epoch, index, attempt, _STREAM_REPLACE) % (len(pool) - 1)
        own = bisect.bisect_left(pool, index)  # pools are sorted
        return pool[k + 1] if k >= own else pool[k]

    # -------------------------------------------------------------------------------- loading
    def modality_lengths(self, lengths: str = "words") -> list[tuple[str, int]]:
        """(kind, length) per position, for the sampler. "words" is the release's estimate (whitespace-split words
        over all turns); "tokens" tokenises every conversation (exact, slower)."""
        if lengths == "words":
            return [(e.kind, e.num_words()) for e in self.entries]
        if lengths == "tokens":
            return [(e.kind, len(self.tokenize(e)[0])) for e in self.entries]
        raise ValueError(f"lengths must be 'words' or 'tokens', got {lengths!r}")

    def tokenize(self, entry: Entry) -> tuple[list[int], list[int]]:
        if self.objective == "captions":
            return tokenize_caption(entry.conversations, self.tokenizer, self.max_length)
        return tokenize_conversation(entry.conversations, self.tokenizer, self.prompt_format, self.max_length,
                                     has_visual=entry.kind != "text", release_quirks=self.release_quirks)

    def _load(self, position: int) -> Any:
        return load_media(self.entries[position], self.media_root, self.decoder, self.timeout_s, self.frames)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """`dataset[i]`, or `dataset[(i, epoch)]` to pin the epoch (for persistent DataLoader workers, whose copy of
        the dataset does not see `set_epoch`)."""
        from merv_fast.data.decode import MediaError

        requested, epoch = (key if isinstance(key, tuple) else (key, self.epoch))
        requested, epoch = int(requested), int(epoch)
        if not 0 <= requested < len(self.entries):
            raise IndexError(f"index {requested} out of range for a dataset of {len(self.entries)}")
        failures: list[BadSample] = []
        position = requested
        for attempt in range(self.max_attempts + 1):
            if attempt > 0:
                position = self.replacement_for(requested, attempt, epoch)
            entry = self.entries[position]
            try:
                frames = self._load(position)
            except MediaError as err:
                bad = BadSample(position, entry.id, str(getattr(err, "path", entry.media)),
                                str(getattr(err, "reason", err)), epoch, requested, attempt)
                failures.append(bad)
                self.bad_samples.append(bad)
                log.warning("bad sample: entry %d (id %r) %s: %s (loading position %d, epoch %d: %d of %d "
                            "replacement attempts used)", entry.index, entry.id, bad.path, bad.reason, requested,
                            epoch, attempt, self.max_attempts)
                continue
            for bad in failures:
                bad.replacement = position
            input_ids, labels = self.tokenize(entry)
            return Sample(position, entry.id, entry.kind, frames, input_ids, labels,
                          self.flip_for(requested, epoch), requested, failures)
        first = self.entries[requested]
        raise DatasetError(
            f"entry {first.index} (id {first.id!r}) is broken and {self.max_attempts} replacement attempts failed "
            f"too (is the media root {str(self.media_root)!r} right?); failures:\n"
            + "\n".join(f"  entry {self.entries[b.index].index} {b.path}: {b.reason}" for b in failures))

    def bad_summary(self) -> dict:
        """What went wrong in this process: counts per reason and the distinct broken entries."""
        return summarize_bad_samples(self.bad_samples)


def summarize_bad_samples(bad_samples: Sequence[BadSample]) -> dict:
    """A summary of bad samples (e.g. collected from batches across DataLoader workers) for the end of a run."""
    distinct = {}
    for b in bad_samples:
        distinct.setdefault(b.index, b)
    return {
        "failures": len(bad_samples),
        "distinct_entries": len(distinct),
        "by_reason": dict(Counter(b.reason for b in bad_samples).most_common()),
        "entries": [{"index": b.index, "id": b.id, "path": b.path, "reason": b.reason} for b in distinct.values()],
    }
