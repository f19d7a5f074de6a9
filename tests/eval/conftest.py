"""Shared by the evaluation tests: the synthesized evaluation sets (written once per session) and tiny models."""

import pytest
import torch


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory) -> dict:
    """{"mcq": dir, "NExT-QA-synth": dir, "openended": dir} written by `merv-fast data synth --eval`'s code."""
    from pathlib import Path

    from merv_fast.eval.synth import synthesize_eval

    sets = synthesize_eval(tmp_path_factory.mktemp("eval_sets"), videos=4, seed=0)
    return {Path(d).name: d for d in sets}


@pytest.fixture(scope="session")
def answering(eval_sets):
    """(model, tokenizer): tiny, random, biased to answer an option letter then EOS (as a trained model does), its
    letters centred on the multiple-choice sets so that which letter wins changes from question to question."""
    from merv_fast.eval.answering import answer_states, center_letters
    from merv_fast.measure.eval_areas import answering_model, scorers

    model, tokenizer = answering_model("tiny", torch.device("cpu"))
    items, visual, letters, _ = scorers(model, tokenizer, "mc", [eval_sets["mcq"], eval_sets["NExT-QA-synth"]], 7)
    center_letters(model, tokenizer, answer_states(letters, items, visual))
    return model, tokenizer


@pytest.fixture(scope="session")
def rambling():
    """(model, tokenizer): tiny at random init, unbiased: it generates arbitrary tokens (open-ended tests)."""
    from merv_fast.config import get_preset
    from merv_fast.pretrained.weights import build_eval_model, eval_tokenizer

    torch.manual_seed(1)
    cfg = get_preset("tiny")
    model, _ = build_eval_model(cfg, None, torch.device("cpu"), torch.float32)
    return model, eval_tokenizer(cfg)


@pytest.fixture(scope="session")
def mc_scoring(answering, eval_sets):
    """(questions of both multiple-choice sets, their visual tokens, the letter Answerer at batch 7, the release-
    style generating one at batch size 1), visual tokens computed once."""
    from merv_fast.measure.eval_areas import scorers

    model, tokenizer = answering
    return scorers(model, tokenizer, "mc", [eval_sets["mcq"], eval_sets["NExT-QA-synth"]], 7, generate=True)
