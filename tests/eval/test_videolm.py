"""Asking questions: `VideoLM.generate` answers as `merv-fast eval --task open` does (greedy), computes a video's
visual tokens once for several questions, samples as transformers' warpers do, and streams its answers in order."""

import io
import json

import pytest
import torch

from merv_fast.eval import videolm as videolm_module
from merv_fast.eval.ask import run_ask
from merv_fast.eval.decide import Sampling
from merv_fast.eval.layout import find_video, load_eval_set
from merv_fast.eval.runner import EvalSettings, run_eval
from merv_fast.eval.videolm import VideoLM


def open_questions(eval_sets):
    root = eval_sets["openended"]
    items = load_eval_set(root, "open")
    return items, [f"{root}/{find_video(root, i.video_name)}" for i in items]


def test_greedy_answers_equal_eval_open_ended_answers(rambling, eval_sets, tmp_path):
    model, tokenizer = rambling
    items, videos = open_questions(eval_sets)
    run_eval(EvalSettings("open", [eval_sets["openended"]], str(tmp_path), batch_size=3, max_new_tokens=6,
                          show_progress=False), model, tokenizer)
    lines = (tmp_path / "openended_pred_merge.jsonl").read_text().splitlines()
    expected = {json.loads(line)["question_id"]: json.loads(line)["pred"] for line in lines}
    answers = VideoLM(model, tokenizer).generate(videos, [i.question for i in items], max_new_tokens=6,
                                                 batch_size=5)
    assert answers == [expected[i.question_id] for i in items]
    assert len(set(answers)) > 1  # the answers differ between questions: the comparison can fail


def test_a_video_is_encoded_once_for_all_its_questions(rambling, eval_sets, monkeypatch):
    model, tokenizer = rambling
    _, videos = open_questions(eval_sets)
    read = []
    real = videolm_module.read_clip
    monkeypatch.setattr(videolm_module, "read_clip", lambda clip, *a: read.append(clip.path) or real(clip, *a))
    answers = VideoLM(model, tokenizer).generate(videos[0], ["What happens?", "Why?", "Is it raining?"],
                                                 max_new_tokens=2, batch_size=2)
    assert len(answers) == 3 and read == [videos[0]]
    with pytest.raises(ValueError, match="2 videos and 3 questions"):
        VideoLM(model, tokenizer).generate(videos[:2], ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match="num_beams"):
        VideoLM(model, tokenizer).generate(videos[0], "a?", num_beams=4)


def test_sampling_as_transformers_warpers():
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    sampling = Sampling(do_sample=True, temperature=0.7, top_p=0.8, top_k=10)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)])
    expected = warpers(torch.zeros(3, 1, dtype=torch.long), logits.clone()).softmax(-1)
    draws = sampling.pick(logits.repeat(4000, 1), torch.Generator().manual_seed(0)).view(4000, 3)
    frequency = torch.stack([torch.bincount(draws[:, r], minlength=50).float() / len(draws) for r in range(3)])
    assert torch.equal(frequency > 0, expected > 0)  # exactly the tokens the warpers keep
    torch.testing.assert_close(frequency, expected, atol=0.03, rtol=0)
    assert torch.equal(Sampling(do_sample=True, top_k=1).pick(logits, None), logits.argmax(-1))
    assert torch.equal(Sampling().pick(logits, None), logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        Sampling(do_sample=True, temperature=0.0)


def test_sampled_answers_repeat_with_a_seed_and_stream_in_order(rambling, eval_sets):
    model, tokenizer = rambling
    _, videos = open_questions(eval_sets)
    lm = VideoLM(model, tokenizer)
    questions = ["What happens?", "Describe the video in detail.", "Why?"]
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, batch_size=2)
    pieces: dict[int, list] = {}
    first = lm.generate(videos[0], questions, stream=lambda i, text, done: pieces.setdefault(i, []).append(
        (text, done)), **kwargs)
    assert first != lm.generate(videos[0], questions, **{**kwargs, "seed": 4})
    for i, answer in enumerate(first):
        assert "".join(t for t, _ in pieces[i]).strip() == answer
        assert [done for _, done in pieces[i]].count(True) == 1 and pieces[i][-1][1]
    out = io.StringIO()
    printed = run_ask(lm, [videos[0]], questions, out=out, **kwargs)
    assert printed == first  # the same seed, the same draws
    text = out.getvalue()
    positions = [text.index(f"{videos[0]}: {q}") for q in questions]
    assert positions == sorted(positions)
    for q, answer in zip(questions, first):
        assert f"== {videos[0]}: {q}\n{answer}" in text
