"""`merv-fast eval`: a run over one or more benchmark directories, batched, resumable and sharded over ranks.

Questions are grouped by video (in file order) and the groups dealt out to ranks round-robin (`groups[rank::world]`
under torchrun), so that a video's questions stay on one rank and its visual tokens are computed once. Each batch
of questions decodes its videos (the spec's frames of the clip window), computes their visual tokens in one pass
(kept for the next batch, where a video's questions continue), then answers:
- `mc` (default): the option letters' logits after one forward pass (decide.letter_decisions);
- `mc --generate`: the release's way, greedy generation (up to `max_new_tokens`) read by its first-character rule;
- `open`: greedy generation, the answer text for an external LLM judge.
Every batch's answers are appended to this rank's prediction file (store.py) before the next batch starts. At the
end rank 0 merges every rank's answers into the release's prediction files (`{benchmark}_pred_merge.jsonl` for
open-ended, `{benchmark}_naive_pred_merge.jsonl` for multiple choice, one JSON line per question: the question and
answer entries, `pred`, and for multiple choice `question_text`, `answer_char`, `acc`) and writes `metrics.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merv_fast.data.decode import MediaError, resolve_media_path
from merv_fast.eval import decide, inputs, prompts
from merv_fast.eval.layout import EvalItem, find_video, load_eval_set
from merv_fast.eval.metrics import summarize
from merv_fast.progress import progress
from merv_fast.eval.store import PredictionStore
from merv_fast.eval.videos import Clip, read_clip

log = logging.getLogger("merv_fast.eval")


@dataclass
class EvalSettings:
    task: str  # "mc" | "open"
    data: list[str]  # benchmark directories (release layout)
    out: str
    weights: str | None = None  # trained weights (merv_fast.pretrained.weights); their own model unless --preset
    weights_roots: list[str] = field(default_factory=list)  # where a release model's pretrained parts are
    hub_cache: str | None = None
    preset: str | None = None
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    batch_size: int = 8
    generate: bool = False  # mc: the release's generation-based decision instead of the letter logits
    max_new_tokens: int = 512
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    decoder: str = "auto"
    timeout_s: float | None = None
    show_progress: bool = True

    @property
    def mode(self) -> str:
        return "letters" if self.task == "mc" and not self.generate else "generate"

    def validate(self) -> None:
        if self.task not in ("mc", "open"):
            raise ValueError(f"--task must be mc or open, got {self.task!r}")
        if self.generate and self.task != "mc":
            raise ValueError("--generate is for --task mc (open-ended answers are always generated)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")
        if not self.data:
            raise ValueError("no --data directory given")


def merge_file_name(benchmark: str, task: str) -> str:
    return f"{benchmark}_naive_pred_merge.jsonl" if task == "mc" else f"{benchmark}_pred_merge.jsonl"


def load_items(directories: list[str], task: str) -> tuple[list[EvalItem], dict[str, str]]:
    items, where = [], {}
    for directory in directories:
        loaded = load_eval_set(directory, task)
        name = Path(directory).resolve().name
        if name in where:
            raise ValueError(f"two --data directories are both named {name!r} ({where[name]}, {directory}); "
                             "the directory name is the benchmark's name")
        where[name] = str(directory)
        items += loaded
    return items, where


def video_groups(items: list[EvalItem]) -> list[list[EvalItem]]:
    groups: dict[tuple[str, str], list[EvalItem]] = {}
    for item in items:
        groups.setdefault((item.benchmark, item.video_name), []).append(item)
    return list(groups.values())


def clip_key(item: EvalItem) -> tuple:
    return (item.benchmark, item.video_name, item.clip, item.end_frame)


class Answerer:
    """Answers batches of questions with one model; holds the visual tokens of the last batch's clips."""

    def __init__(self, model, tokenizer, settings: EvalSettings, directories: dict[str, str]):
        self.model, self.tokenizer, self.settings, self.directories = model, tokenizer, settings, directories
        llm = model.config.llm
        self.prompt_format, self.max_text, self.has_bos = llm.prompt_format, llm.max_text_tokens, llm.has_bos
        self.frames = model.config.frames_sampled
        self.letter_ids = decide.letter_token_ids(tokenizer) if settings.task == "mc" else None
        self.cache: dict[tuple, torch.Tensor] = {}

    def visual_for(self, batch: list[EvalItem]) -> tuple[dict[tuple, torch.Tensor], list[dict]]:
        """(visual tokens [V, D] of each of the batch's clips, by clip key; the broken-video rows). The previous
        batch's clips are reused where they recur."""
        wanted = list(dict.fromkeys(clip_key(i) for i in batch))
        first = {clip_key(i): i for i in reversed(batch)}
        kept = {k: self.cache[k] for k in wanted if k in self.cache}
        frames, flips, fresh, broken = [], [], [], []
        for key in wanted:
            if key in kept:
                continue
            item, directory = first[key], self.directories[key[0]]
            try:
                path = resolve_media_path(directory, find_video(directory, item.video_name))
                start, end = item.clip or (None, None)
                frames.append(read_clip(Clip(str(path), start, end, item.end_frame), self.frames,
                                        self.settings.decoder, self.settings.timeout_s))
            except MediaError as err:
                log.warning("broken video %s (%s, question ids %s): %s", err.path, key[0],
                            [i.question_id for i in batch if clip_key(i) == key], err.reason)
                broken += [{"key": i.key, "benchmark": i.benchmark, "question_id": i.question_id,
                            "video_name": i.video_name, "path": err.path, "reason": err.reason}
                           for i in batch if clip_key(i) == key]
                continue
            flips.append(inputs.video_flip(self.settings.seed, path.name))
            fresh.append(key)
        if fresh:
            kept.update(zip(fresh, inputs.visual_tokens(self.model, frames, flips)))
        self.cache = kept
        return kept, broken

    def predict(self, batch: list[EvalItem], visual: dict[tuple, torch.Tensor]) -> list[str]:
        """The answer to each question: an option letter, or the generated text."""
        ids = inputs.tokenize_prompts(self.tokenizer, [prompts.prompt_for(i, self.prompt_format) for i in batch],
                                      self.max_text, self.has_bos)
        rows = torch.stack([visual[clip_key(i)] for i in batch])
        embeds, mask, positions = inputs.left_padded_inputs(self.model, ids, rows, self.tokenizer.pad_token_id)
        if self.settings.mode == "letters":
            chosen, _ = decide.letter_decisions(self.model, embeds, mask, positions, self.letter_ids,
                                                [len(i.options) for i in batch])
            return [prompts.LETTERS[c] for c in chosen]
        tokens = decide.generate_tokens(self.model, embeds, mask, positions, self.tokenizer.eos_token_id,
                                        self.settings.max_new_tokens)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    def answer(self, batch: list[EvalItem]) -> tuple[list[dict], list[dict]]:
        """(prediction lines, broken-video lines) for one batch."""
        visual, broken = self.visual_for(batch)
        ready = [i for i in batch if clip_key(i) in visual]
        rows = []
        for item, pred in zip(ready, self.predict(ready, visual) if ready else []):
            row = {**item.record, "key": item.key, "benchmark": item.benchmark, "question_type": item.question_type,
                   "pred": pred}
            if self.settings.task == "mc":
                row.update(question_text=prompts.message_for(item), answer_char=prompts.answer_letter(item),
                           acc=prompts.release_correct(pred, item))
            else:
                row["message"] = prompts.message_for(item)
            rows.append(row)
        return rows, broken


def model_config(settings: EvalSettings, source):
    """The model to evaluate: the one the weights describe (pretrained/load.py), unless a preset or config file is
    named (then strict loading checks that the weights fit it); random-init `tiny` without either."""
    from merv_fast.config import load_config
    from merv_fast.pretrained.load import config_for_weights

    if source is not None and settings.preset is None and settings.config is None:
        cfg = config_for_weights(source, settings.overrides, settings.weights_roots, settings.hub_cache)
        if cfg is not None:
            return cfg
    return load_config(settings.preset or "tiny", settings.config, settings.overrides)


def _build(settings: EvalSettings, cfg, source, device: torch.device):
    from merv_fast.pretrained.weights import build_eval_model, eval_dtype, eval_tokenizer

    # as the trainer: weights not in the files (random-init test encoders) match its own
    torch.manual_seed(source.seed if source is not None and source.seed is not None else settings.seed)
    model, _ = build_eval_model(cfg, source, device, eval_dtype(device, settings.dtype))
    return model, eval_tokenizer(cfg)


def _write_outputs(store: PredictionStore, items: list[EvalItem], settings: EvalSettings) -> dict:
    answered = store.answered()
    broken = [b for b in store.broken() if b["key"] not in answered]
    mine = [answered[i.key] for i in items if i.key in answered]
    for benchmark in dict.fromkeys(i.benchmark for i in items):
        lines = [json.dumps(r) + "\n" for r in mine if r["benchmark"] == benchmark]
        (store.out / merge_file_name(benchmark, settings.task)).write_text("".join(lines))
    metrics = summarize(settings.task, settings.mode, len(items), mine, broken)
    (store.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def run_eval(settings: EvalSettings, model=None, tokenizer=None) -> dict | None:
    """Evaluate; returns the metrics on rank 0 (None elsewhere). Tests pass a ready `model` and `tokenizer`."""
    from merv_fast.train.parallel import barrier, init_distributed

    settings.validate()
    items, directories = load_items(settings.data, settings.task)
    device = next(model.parameters()).device if model is not None else None
    info = init_distributed(str(device) if device is not None else settings.device)
    store = PredictionStore(settings.out, info.rank)
    source = cfg = None
    if model is None:
        from merv_fast.pretrained.weights import describe_weights

        source = describe_weights(settings.weights) if settings.weights is not None else None
        cfg = model_config(settings, source)
    run = {"task": settings.task, "mode": settings.mode, "weights": settings.weights,
           "weights_read": source.record() if source is not None else None,
           "model": (cfg or model.config).name,
           "max_new_tokens": settings.max_new_tokens if settings.mode == "generate" else None}
    if info.is_main:
        store.check_run(run)
    barrier()
    store.check_run(run)
    if model is None:
        model, tokenizer = _build(settings, cfg, source, info.device)
    answered = store.answered()
    store.start()
    todo = [i for group in video_groups(items)[info.rank::info.world_size] for i in group if i.key not in answered]
    answerer = Answerer(model, tokenizer, settings, directories)
    bar = progress(len(todo), f"eval {settings.task} ({settings.mode}) rank {info.rank}", "questions",
                   settings.show_progress)
    with torch.no_grad():
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            store.add(*answerer.answer(batch))
            bar.update(len(batch))
    bar.close()
    barrier()
    return _write_outputs(store, items, settings) if info.is_main else None
