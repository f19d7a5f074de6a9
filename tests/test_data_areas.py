"""The GPU suite's `data` area, run through the suite on the CPU at tiny scale."""

import json

from merv_fast.measure import suite


def test_data_area_writes_frames_per_s_rows(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["data"], allow_cpu=True, modules=["merv_fast.measure.data_areas"])
    assert statuses == {"ceilings": "done", "data": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["config"]["backend"]: r for r in json.loads(path.read_text())["results"] if r["area"] == "data"}
    assert "release" in rows and "cpu-decode(pyav)+native" in rows
    for name, r in rows.items():
        assert r["frames_per_s"] > 0 and r["config"]["frames_per_s_per_core"] > 0
        if name != "release":
            assert r["speedup"] > 0 and r["reference"]["name"].startswith("release")
    missing = rows["release"]["config"]["missing"]
    assert "cpu-decode(pyav)+gpu-preprocess" in missing or "cpu-decode(pyav)+gpu-preprocess" in rows
    assert "dali-mixed" in missing or "dali-mixed" in rows
