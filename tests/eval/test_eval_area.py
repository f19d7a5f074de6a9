"""The GPU suite's `eval` area, run through the suite on the CPU at tiny shapes."""

import json

from merv_fast.measure import suite


def test_eval_area_writes_rows(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["eval"], allow_cpu=True)
    assert statuses == {"ceilings": "done", "eval": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    mc = rows["mc scoring tiny: letter logits vs generation"]
    assert mc["speedup"] > 0 and mc["samples_per_s"] > 0 and mc["config"]["decisions_agree"] == 1.0
    assert mc["reference"]["name"].startswith("release: greedy generation at batch size 1")
    assert rows["mc end to end tiny: merv-fast eval vs --generate --batch-size 1"]["speedup"] > 0
    assert rows["open-ended generation tiny: batched vs batch size 1"]["speedup"] > 0
    generate = rows["generate tiny: VideoLM.generate batched vs batch size 1"]
    assert generate["tokens_per_s"] > 0 and generate["config"]["tokens_per_s_batch1"] > 0
    assert 0 < generate["config"]["new_tokens"] <= 16 * 16
