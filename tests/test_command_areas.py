"""The GPU suite's command areas (merv-fast train, merv-fast profile, the bench/ suites), run on the CPU at tiny
shapes through the suite itself, and the conversion of pytest-benchmark's JSON into results rows."""

import json

from merv_fast.measure import suite
from merv_fast.measure.command_areas import benchmark_rows


def test_trainer_profile_and_bench_suite_areas_write_rows(tmp_path):
    statuses = suite.run_suite(tmp_path, only=["trainer-1b", "trainer-7b", "profile", "bench-visual"], allow_cpu=True)
    assert set(statuses.values()) == {"done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}

    trainer = rows["merv-fast train tiny vs single-tiny"]
    assert trainer["reference"]["name"].startswith("single-tiny (merv-fast train")
    assert trainer["samples_per_s"] > 0 and trainer["tokens_per_s"] > 0 and trainer["speedup"] > 0
    assert trainer["config"]["steps_measured"] == 2 and trainer["config"]["ranks"] == 1
    assert set(trainer["config"]["phases_s"]["merv"]) >= {"encoders", "llm_forward", "backward", "optimizer"}
    assert not any("7b" in name for name in rows)  # full-size only: nothing measured on a CPU
    planned = rows["predicted vs measured: merv-fast train tiny"]["config"]  # merv-fast plan beside the run
    assert planned["predicted_step_ms"] > 0 and planned["ranks"] == 1 and planned["micro_batch"] == 2
    assert 0 < planned["text_tokens_mean"] <= planned["text_tokens_max"]

    profiled = rows["profiled step tiny vs single-tiny"]
    merv_phases, base_phases = (profiled["config"]["phases_ms_per_step"][k] for k in ("merv", "baseline"))
    assert all(merv_phases[f"encoder {name}"] > 0 for name in ("languagebind", "dinov2", "vivit", "siglip"))
    assert base_phases["encoder languagebind"] > 0 and "encoder dinov2" not in base_phases
    assert profiled["ours"]["median_ms"] > 0 and profiled["reference"]["median_ms"] > 0

    bench = {name: r for name, r in rows.items() if r["area"] == "bench"}
    assert "test_pool[ours-tiny-2-dtype0]" in bench and "test_pool[release-tiny-2-dtype0]" in bench
    ours = bench["test_pool[ours-tiny-2-dtype0]"]
    assert ours["reference"]["name"] == "impl=release" and ours["speedup"] > 0
    assert ours["config"]["params"]["dtype"] == "float32"
    assert "reference" not in bench["test_pool[release-tiny-2-dtype0]"]


def _bench(name, params, median_s, extra=None):
    return {"name": name, "fullname": f"bench/x.py::{name}", "params": params, "extra_info": extra or {},
            "stats": {"median": median_s, "q1": median_s * 0.9, "q3": median_s * 1.1}}


def test_benchmark_rows_prefer_cuda_medians_and_pair_references():
    report = {"benchmarks": [
        _bench("test_op[ours-8]", {"impl": "ours", "batch": 8}, 0.010, {"cuda_median_ms": 2.0, "cuda_p20_ms": 1.9,
                                                                         "cuda_p80_ms": 2.2, "tokens": 64}),
        _bench("test_op[release-8]", {"impl": "release", "batch": 8}, 0.011, {"cuda_median_ms": 5.0}),
        _bench("test_op[ours-1]", {"impl": "ours", "batch": 1}, 0.004),  # no reference at batch 1
        _bench("test_other[3]", {"n": 3}, 0.002),
    ]}
    rows = {r["name"]: r for r in benchmark_rows(report, "x.py")}
    ours8 = rows["test_op[ours-8]"]
    assert ours8["ours"] == {"median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.2}
    assert ours8["config"]["timing"] == "CUDA events" and ours8["config"]["tokens"] == 64
    assert ours8["speedup"] == 2.5 and ours8["reference"]["median_ms"] == 5.0
    assert rows["test_op[ours-1]"]["ours"]["median_ms"] == 4.0 and "reference" not in rows["test_op[ours-1]"]
    assert rows["test_other[3]"]["config"]["timing"].startswith("pytest-benchmark host clock")
