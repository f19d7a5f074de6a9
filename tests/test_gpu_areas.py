"""The GPU suite's real measurement areas, run through the suite on the CPU at tiny shapes."""

import json

from merv_fast.measure import suite


def test_visual_encoders_and_train_areas_write_rows(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["visual", "encoders", "train"], allow_cpu=True)
    assert statuses == {"ceilings": "done", "visual": "done", "encoders": "done", "train": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    fuse = rows["project_fuse fwd+bwd tiny B=2"]
    assert fuse["reference"]["name"].startswith("release") and fuse["speedup"] > 0
    assert "share_of_ceiling" in fuse and fuse["ratio_to_floor"] > 0
    assert rows["pool_concat tiny B=2"]["speedup"] > 0
    assert {f"{name} forward B=1 videos (2 layers)" for name in ("languagebind", "dinov2", "siglip")} <= set(rows)
    train = rows["training step tiny vs single-tiny"]
    assert train["samples_per_s"] > 0 and train["reference"]["name"].startswith("single-tiny")
    # merv-fast plan's prediction of that step beside the measurement (peak memory: a CPU run has no allocator peak)
    planned = rows["predicted vs measured: bench training step tiny"]["config"]
    assert planned["predicted_step_ms"] > 0 and planned["precision"] == "fp32" and planned["text_tokens_max"] > 0
    assert planned["step_error"] == round(planned["predicted_step_ms"] / rows["predicted vs measured: bench training "
                                                                             "step tiny"]["ours"]["median_ms"] - 1, 3)
    assert planned["measured_peak_bytes"] is None and planned["predicted_peak_bytes"] > 0
    assert all(v.startswith("this run's") for v in planned["rates_from"].values())  # its own ceilings
