"""GPU-suite area `eval`: questions/s of multiple-choice scoring from the option letters' logits (one forward pass
per batch) against the release's generation-based scoring (greedy generation at batch size 1), on the same
questions in the same run, and batched open-ended generation against batch size 1.

Both go through `merv_fast.eval.runner` end to end (decode, visual tokens once per video, LLM) on the synthesized
evaluation sets (merv_fast.eval.synth). The model is random (merv-1b in bf16 on a GPU, tiny on a CPU) made to
answer as a trained one does, an option letter and then EOS (merv_fast.eval.answering): generation then stops
after two tokens, as the release's does on a trained model, which is the comparison least favourable to the
letter scoring (a model that rambles costs generation up to 512 steps). The row also records how often the two
decisions agree. The open-ended rows use the unbiased random model (32 new tokens per answer), and so does the
`generate` row: `VideoLM.generate` (what `merv_fast.load_pretrained(...).generate` and `merv-fast ask` run) asking one
video 16 questions, tokens/s batched vs one question at a time.
`bench/bench_eval.py` runs the same comparison under pytest-benchmark.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import measure, summarize

FULL = torch.cuda.is_available()
# `VideoLM.generate`: one video asked 16 questions, 16 new tokens each (the unbiased random model rarely stops early)
ASK_QUESTIONS = [q.format(m=m) for m in ("video", "clip", "scene", "film") for q in
                 ("What happens in this {m}?", "Describe the {m} in detail.", "Is the camera moving in the {m}?",
                  "Summarise the {m} in one sentence.")]
ASK_TOKENS = 16


def answering_model(preset: str, device: torch.device, answering: bool = True):
    """(model, tokenizer): `preset` at random init in the eval dtype; `answering`: biased to answer a letter then
    EOS (else it generates arbitrary tokens up to the limit, as open-ended answers run long)."""
    from merv_fast.config import get_preset
    from merv_fast.eval.answering import bias_toward_letters
    from merv_fast.pretrained.weights import build_eval_model, eval_dtype, eval_tokenizer

    torch.manual_seed(0)
    cfg = get_preset(preset)
    model, _ = build_eval_model(cfg, None, device, eval_dtype(device))
    tokenizer = eval_tokenizer(cfg)
    if answering:
        bias_toward_letters(model, tokenizer)
    return model, tokenizer


def scorers(model, tokenizer, task: str, data: list[str], batch: int, **generation):
    """(questions, their visual tokens by clip, the fast Answerer, the release-style one at batch size 1): what
    both scorings need, computed once, so that timing them compares the decisions alone."""
    from merv_fast.eval.runner import Answerer, EvalSettings, load_items

    items, directories = load_items(data, task)
    fast = Answerer(model, tokenizer, EvalSettings(task, data, "", batch_size=batch,
                                                   max_new_tokens=generation.get("max_new_tokens", 512)), directories)
    release = Answerer(model, tokenizer, EvalSettings(task, data, "", batch_size=1, **generation), directories)
    visual: dict = {}
    for start in range(0, len(items), batch):
        visual.update(fast.visual_for(items[start:start + batch])[0])
    return items, visual, fast, release


def in_batches(answerer, items, visual, batch: int) -> list[str]:
    return [p for start in range(0, len(items), batch) for p in answerer.predict(items[start:start + batch], visual)]


def end_to_end_ms(model, tokenizer, data: list[str], out: Path, **settings) -> float:
    """Wall time of one fresh `merv-fast eval` run (decode, visual tokens, scoring, files) in this process."""
    from merv_fast.eval.runner import EvalSettings, run_eval

    start = time.perf_counter()
    run_eval(EvalSettings("mc", data, str(out), show_progress=False, **settings), model, tokenizer)
    if FULL:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def eval_area(results: ResultsFile, ceilings: dict) -> None:
    from merv_fast.eval.prompts import release_choice
    from merv_fast.eval.synth import synthesize_eval

    preset, videos, batch, iters = ("merv-1b", 4, 8, 3) if FULL else ("tiny", 2, 8, 1)
    device = torch.device("cuda" if FULL else "cpu")
    model, tokenizer = answering_model(preset, device)
    dtype = str(model.llm.dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory() as tmp:
        sets = synthesize_eval(Path(tmp) / "sets", videos=videos, seed=0)
        mc = [d for d in sets if not d.endswith("openended")]
        opened = [d for d in sets if d.endswith("openended")]

        items, visual, fast, release = scorers(model, tokenizer, "mc", mc, batch, generate=True)
        with torch.no_grad():
            ours = measure(lambda: in_batches(fast, items, visual, batch), warmup=1, iters=iters)
            ref = measure(lambda: in_batches(release, items, visual, 1), warmup=1, iters=iters)
            letters, generated = in_batches(fast, items, visual, batch), in_batches(release, items, visual, 1)
        agree = sum(release_choice(g) == l.lower() for g, l in zip(generated, letters)) / len(items)
        results.append(row(
            "eval", f"mc scoring {preset}: letter logits vs generation", {
                "preset": preset, "questions": len(items), "batch_size": batch, "dtype": dtype,
                "questions_per_s_generation": round(len(items) / (ref.median_ms / 1e3), 3),
                "decisions_agree": round(agree, 4), "answers": "a letter then EOS (biased random model)",
                "scope": "scoring from ready visual tokens (prompt, LLM, decision)"},
            ours, ref, reference_name="release: greedy generation at batch size 1 (max 512 new tokens)",
            samples_per_s=len(items) / (ours.median_ms / 1e3)))

        runs = [Path(tmp) / f"run{k}" for k in range(3)]
        if FULL:
            end_to_end_ms(model, tokenizer, mc, runs[0], batch_size=batch)  # one-time costs (decoder, allocator)
        letters_ms = end_to_end_ms(model, tokenizer, mc, runs[1], batch_size=batch)
        generation_ms = end_to_end_ms(model, tokenizer, mc, runs[2], batch_size=1, generate=True)
        results.append(row(
            "eval", f"mc end to end {preset}: merv-fast eval vs --generate --batch-size 1", {
                "preset": preset, "questions": len(items), "batch_size": batch, "dtype": dtype,
                "scope": "whole run: decode, visual tokens once per clip, scoring, prediction files"},
            summarize([letters_ms]), summarize([generation_ms]), reference_name="--generate --batch-size 1",
            samples_per_s=len(items) / (letters_ms / 1e3)))

        del model, fast, release, visual
        model, tokenizer = answering_model(preset, device, answering=False)
        items, visual, fast, release = scorers(model, tokenizer, "open", opened, batch, max_new_tokens=32)
        with torch.no_grad():
            ours = measure(lambda: in_batches(fast, items, visual, batch), warmup=1, iters=iters)
            ref = measure(lambda: in_batches(release, items, visual, 1), warmup=1, iters=iters)
        results.append(row(
            "eval", f"open-ended generation {preset}: batched vs batch size 1", {
                "preset": preset, "questions": len(items), "batch_size": batch, "max_new_tokens": 32, "dtype": dtype,
                "questions_per_s_batch1": round(len(items) / (ref.median_ms / 1e3), 3)},
            ours, ref, reference_name="greedy generation at batch size 1 (the release's)",
            samples_per_s=len(items) / (ours.median_ms / 1e3)))

        video = next((Path(opened[0]) / "videos").iterdir())
        generate_area(results, model, tokenizer, str(video), batch, iters, preset, dtype)


def generate_area(results: ResultsFile, model, tokenizer, video: str, batch: int, iters: int, preset: str,
                  dtype: str) -> None:
    """`VideoLM.generate` end to end (decode, visual tokens once, prompts, generation): tokens/s batched vs one
    question at a time."""
    from merv_fast.eval.videolm import VideoLM

    lm = VideoLM(model, tokenizer)
    timings, tokens = {}, {}
    for size in (batch, 1):
        timings[size] = measure(lambda size=size: lm.generate(video, ASK_QUESTIONS, max_new_tokens=ASK_TOKENS,
                                                              batch_size=size), warmup=1, iters=iters)
        tokens[size] = lm.last_new_tokens
    results.append(row(
        "eval", f"generate {preset}: VideoLM.generate batched vs batch size 1", {
            "preset": preset, "questions": len(ASK_QUESTIONS), "videos": 1, "batch_size": batch,
            "max_new_tokens": ASK_TOKENS, "dtype": dtype, "new_tokens": tokens[batch],
            "tokens_per_s_batch1": round(tokens[1] / (timings[1].median_ms / 1e3), 2),
            "scope": "whole call: decode, visual tokens once, prompts, generation"},
        timings[batch], timings[1], reference_name="the same call with batch_size=1",
        tokens_per_s=tokens[batch] / (timings[batch].median_ms / 1e3)))


register_area("eval", eval_area, budget_s=300)
