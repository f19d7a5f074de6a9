"""The GPU suite's `encoder-modes` area, run through the suite on the CPU at tiny shapes."""

import json

from merv_fast.config import ENCODER_MODES
from merv_fast.measure import suite


def test_encoder_modes_area_writes_rows(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["encoder-modes"], allow_cpu=True)
    assert statuses == {"ceilings": "done", "encoder-modes": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    for kind in ("video", "image"):
        for mode in ENCODER_MODES:
            r = rows[f"encoders {kind} B=1 {mode}"]
            assert r["reference"]["name"].startswith("release-style") and r["speedup"] > 0
            assert r["config"]["mode"] == mode and r["share_of_ceiling"] > 0
    prefetch = rows["prefetch overlap: training step tiny B=2"]
    assert prefetch["config"]["prefetcher"] is False and prefetch["samples_per_s"] > 0
