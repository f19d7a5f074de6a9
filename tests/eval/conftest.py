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
def answering():
    """(model, tokenizer): tiny, random, biased to answer an option letter then EOS (as a trained model does)."""
    from merv_fast.measure.eval_areas import answering_model

    return answering_model("tiny", torch.device("cpu"))


@pytest.fixture(scope="session")
def rambling():
    """(model, tokenizer): tiny at random init, unbiased: it generates arbitrary tokens (open-ended tests)."""
    from merv_fast.config import get_preset
    from merv_fast.eval.weights import build_eval_model, eval_tokenizer

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
