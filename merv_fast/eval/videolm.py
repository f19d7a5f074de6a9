"""Asking a trained MERV about videos, from Python (`merv_fast.load_pretrained(path).generate(...)`) and behind
`merv-fast ask`.

The same machinery as `merv-fast eval`'s open-ended answers, so that greedy answers are the same: each video read as
the release reads one (eval/videos.py), its visual tokens computed once however many questions ask about it, the
prompt built and tokenised as the release's (eval/prompts.py, eval/inputs.py), questions batched with left padding,
and one generation loop with a KV cache (eval/decide.py `generate_tokens`), greedy by default or sampled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from merv_fast.eval import inputs
from merv_fast.eval.decide import Sampling, generate_tokens
from merv_fast.eval.prompts import question_prompt
from merv_fast.eval.videos import Clip, read_clip

def as_clip(video) -> Clip:
    if isinstance(video, Clip):
        return video
    if isinstance(video, (str, Path)):
        return Clip(str(video))
    raise TypeError(f"a video is a path or a merv_fast.eval.videos.Clip, got {type(video).__name__}")


def pairs(videos, questions) -> tuple[list[Clip], list[str]]:
    """(clip, question) per answer: lists of equal length pair up; a single video or question goes with each of
    the other side's."""
    videos = [videos] if isinstance(videos, (str, Path, Clip)) else list(videos)
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not videos or not questions:
        raise ValueError("give at least one video and one question")
    if len(videos) == 1:
        videos = videos * len(questions)
    elif len(questions) == 1:
        questions = questions * len(videos)
    if len(videos) != len(questions):
        raise ValueError(f"{len(videos)} videos and {len(questions)} questions: give one of either, or as many "
                         "videos as questions")
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"a question is a non-empty string, got {q!r}")
    return [as_clip(v) for v in videos], questions


class TextStream:
    """Turns a generation step's growing token lists (`on_step`) into `stream(index, new_text, finished)` calls, one
    per row that has news. Text is decoded whole each time and only its new tail passed on; a tail ending in an
    incomplete character (U+FFFD) waits for the next token. `close()` finishes the rows the token limit cut."""

    def __init__(self, tokenizer, rows: Sequence[int], stream: Callable[[int, str, bool], None]):
        self.tokenizer, self.rows, self.stream = tokenizer, list(rows), stream
        self.emitted = [""] * len(self.rows)
        self.finished = [False] * len(self.rows)

    def __call__(self, tokens: list[list[int]], running: list[bool]) -> None:
        for i, row in enumerate(self.rows):
            if self.finished[i]:
                continue
            text = self.tokenizer.decode(tokens[i], skip_special_tokens=True).lstrip()
            delta = ""
            if text.startswith(self.emitted[i]) and not (text.endswith("\ufffd") and running[i]):
                delta, self.emitted[i] = text[len(self.emitted[i]):], text
            if delta or not running[i]:
                self.finished[i] = not running[i]
                self.stream(row, delta, self.finished[i])

    def close(self) -> None:
        for i, row in enumerate(self.rows):
            if not self.finished[i]:
                self.finished[i] = True
                self.stream(row, "", True)


class VideoLM:
    """A MERV in eval mode with its tokenizer: `generate(videos, questions, ...)` answers each question about its
    video. `decoder`, `timeout_s`: how videos are decoded; `seed`: LanguageBind's per-video flip (the release flips
    at inference too; eval/inputs.py `video_flip`)."""

    def __init__(self, model, tokenizer, source=None, decoder: str = "auto", timeout_s: float | None = None,
                 seed: int = 0):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.decoder, self.timeout_s, self.seed = decoder, timeout_s, seed
        llm = model.config.llm
        self.prompt_format, self.max_text, self.has_bos = llm.prompt_format, llm.max_text_tokens, llm.has_bos
        self.last_new_tokens = 0  # tokens the last `generate` produced, EOS included (for tokens/s)

    @classmethod
    def from_pretrained(cls, path, *, overrides=None, weights_roots=(), hub_cache=None, device=None, dtype=None,
                        decoder: str = "auto", timeout_s: float | None = None, seed: int = 0) -> "VideoLM":
        from merv_fast.pretrained.load import build_pretrained

        model, tokenizer, source = build_pretrained(path, overrides=overrides, weights_roots=weights_roots,
                                                    hub_cache=hub_cache, device=device, dtype=dtype, seed=seed)
        return cls(model, tokenizer, source, decoder, timeout_s, seed)

    @torch.no_grad()
    def visual_tokens(self, clips: Sequence[Clip]) -> torch.Tensor:
        """[N, V, D]: the visual tokens of each clip, in one batch. Raises MediaError for a video it cannot read."""
        frames = [read_clip(c, self.model.config.frames_sampled, self.decoder, self.timeout_s) for c in clips]
        flips = [inputs.video_flip(self.seed, Path(c.path).name) for c in clips]
        return inputs.visual_tokens(self.model, frames, flips)

    @torch.no_grad()
    def generate(self, videos, questions, *, max_new_tokens: int = 512, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = 50, num_beams: int = 1,
                 seed: int | None = None, batch_size: int = 8,
                 stream: Callable[[int, str, bool], None] | None = None) -> list[str]:
        """The answer to each (video, question) pair (see `pairs`), `batch_size` questions per generation batch.
        Greedy by default (the release's evaluation); `do_sample` draws with `temperature`, `top_k`, `top_p`
        (transformers' meaning; `seed` for repeatable draws). `stream(index, text, finished)` receives each answer's
        new text as it is generated, and `finished=True` once with its last piece. Videos are given as paths (a file, a GIF or a JPEG frame folder) or `Clip`s (a window by
        seconds or by frame)."""
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: only num_beams=1 (greedy or sampling) is implemented")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampling = Sampling(do_sample, temperature, top_p, top_k, seed)
        clips, questions = pairs(videos, questions)
        unique = list(dict.fromkeys(clips))  # each video's tokens once, whatever number of questions
        visual: dict[Clip, torch.Tensor] = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            visual.update(zip(chunk, self.visual_tokens(chunk)))
        answers: list[str] = []
        self.last_new_tokens = 0
        for start in range(0, len(questions), batch_size):
            rows = range(start, min(start + batch_size, len(questions)))
            prompts = [question_prompt(questions[i], self.prompt_format) for i in rows]
            ids = inputs.tokenize_prompts(self.tokenizer, prompts, self.max_text, self.has_bos)
            embeds, mask, positions = inputs.left_padded_inputs(
                self.model, ids, torch.stack([visual[clips[i]] for i in rows]), self.tokenizer.pad_token_id)
            on_step = TextStream(self.tokenizer, rows, stream) if stream is not None else None
            tokens = generate_tokens(self.model, embeds, mask, positions, self.tokenizer.eos_token_id,
                                     max_new_tokens, sampling, on_step)
            if on_step is not None:
                on_step.close()
            self.last_new_tokens += sum(len(t) for t in tokens)
            answers += [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return answers
