"""pytest-benchmark suite: multiple-choice scoring of the same questions, from the option letters' logits (one
forward pass per batch of 8) vs the release's generation-based scoring (greedy generation at batch size 1, up to
512 new tokens), in the same run. Questions/s = `extra_info["questions"]` / the benchmark's time. And answering
questions with `VideoLM.generate` (one video, 16 questions on a GPU and 8 on a CPU, 16 new tokens each from the
unbiased random model), batched vs one question at a time: tokens/s = `extra_info["new_tokens"]` / the benchmark's
time.

Both start from the same ready visual tokens (decoding and encoding are the same for both and are left out), on
the synthesized evaluation sets, with a random model made to answer a letter then EOS as a trained one does
(merv_fast.eval.answering; see merv_fast/measure/eval_areas.py, the GPU-suite area `eval` that measures the same).
CPU/CI: tiny in fp32, run once as tests (`--benchmark-disable`). GPU: merv-1b in bf16; the figure of record is the
CUDA-event median in `extra_info["cuda_median_ms"]`.
Measure: `python -m pytest bench/bench_eval.py --benchmark-enable --benchmark-json out.json`.
"""

from pathlib import Path

import pytest
import torch

from merv_fast.eval.synth import synthesize_eval
from merv_fast.measure.eval_areas import answering_model, in_batches, scorers
from merv_fast.measure.pytest_bench import record

CUDA = torch.cuda.is_available()
PRESET, VIDEOS, BATCH = ("merv-1b", 4, 8) if CUDA else ("tiny", 2, 8)


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    model, tokenizer = answering_model(PRESET, torch.device("cuda" if CUDA else "cpu"))
    sets = synthesize_eval(tmp_path_factory.mktemp("eval_sets"), videos=VIDEOS, seed=0)
    mc = [d for d in sets if not d.endswith("openended")]
    return scorers(model, tokenizer, "mc", mc, BATCH, generate=True)


@pytest.mark.parametrize("mode", ["letters", "generation"])
def test_mc_scoring(benchmark, scoring, mode):
    items, visual, fast, release = scoring
    answerer, batch = (fast, BATCH) if mode == "letters" else (release, 1)

    def run():
        with torch.no_grad():
            return in_batches(answerer, items, visual, batch)

    answers = run()
    assert len(answers) == len(items) and all(a[:1] in "ABCDE" for a in answers)
    benchmark.extra_info.update(questions=len(items), batch_size=batch)
    record(benchmark, run, [()], warmup=1, iters=3)


@pytest.fixture(scope="module")
def asking(tmp_path_factory):
    from merv_fast.eval.videolm import VideoLM
    from merv_fast.eval.synth import synthesize_eval

    model, tokenizer = answering_model(PRESET, torch.device("cuda" if CUDA else "cpu"), answering=False)
    sets = synthesize_eval(tmp_path_factory.mktemp("ask_sets"), videos=1, seed=0)
    video = next(p for p in (Path(next(d for d in sets if d.endswith("openended"))) / "videos").iterdir())
    return VideoLM(model, tokenizer), str(video)


@pytest.mark.parametrize("batch", [1, BATCH])
def test_generate(benchmark, asking, batch):
    from merv_fast.measure.eval_areas import ASK_QUESTIONS, ASK_TOKENS

    lm, video = asking
    questions = ASK_QUESTIONS if CUDA else ASK_QUESTIONS[:BATCH]  # CI: one batch's worth

    def run():
        return lm.generate(video, questions, max_new_tokens=ASK_TOKENS, batch_size=batch)

    assert len(run()) == len(questions)
    benchmark.extra_info.update(questions=len(questions), batch_size=batch, new_tokens=lm.last_new_tokens)
    record(benchmark, run, [()], warmup=1, iters=3)
