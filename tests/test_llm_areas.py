"""The GPU suite's `llm` area, run through the suite on the CPU at tiny shapes, and its micro-batches."""

import json

import torch

from merv_fast.config import get_preset
from merv_fast.measure import suite
from merv_fast.measure.llm_areas import MODES, real_tokens, stage2_micro_batches


def test_micro_batches_are_length_grouped_and_count_real_tokens():
    cfg = get_preset("tiny")
    batches = stage2_micro_batches(cfg, 3, text=(5, 60), device=torch.device("cpu"))
    widths = [b[0].shape[1] for b in batches]
    assert widths == sorted(widths) and all(b[0].shape[0] == 8 for b in batches)
    ids, mask, labels, visual = batches[0]
    assert bool((ids[:, 0] == 1).all()) and bool((labels[mask == 0] == -100).all())
    assert real_tokens(batches[0]) == int(mask.sum()) + 8 * cfg.num_visual_tokens


def test_llm_area_writes_a_row_per_mode_and_backend(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["llm"], allow_cpu=True)
    assert statuses == {"ceilings": "done", "llm": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"] if r["area"] == "llm"}
    assert set(rows) == {f"{mode} sdpa tiny" for mode in MODES}  # the only backend with a backward on CPU
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["reference"]["name"].startswith("release: padded batches of 8")
        assert r["config"]["auto_attention"] == "sdpa"
