"""Timing, ceilings and results files (layout per shared/BENCH_RESULTS.md)."""

import json
import re
import time

import pytest
import torch

from merv_fast.measure.ceilings import measure_ceilings
from merv_fast.measure.results import ResultsFile, device_slug, results_path, results_table_markdown, row
from merv_fast.measure.timing import Timing, measure, peak_memory, percentile, summarize


def test_summarize_percentiles_and_spread():
    t = summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.median_ms, t.min_ms, t.iters) == (3.0, 1.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    assert t.spread == pytest.approx((4.2 - 1.8) / 3.0)
    assert percentile([7.0], 0.8) == 7.0


def test_measure_times_each_call_on_cpu():
    t = measure(lambda: time.sleep(0.002), warmup=1, iters=5, device="cpu")
    assert t.iters == 5 and 1.5 <= t.median_ms < 50 and t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms


def test_measure_rotates_arguments():
    seen = []
    measure(lambda x: seen.append(x), warmup=2, iters=5, rotate=[(0,), (1,), (2,)])
    assert seen == [0, 1] + [0, 1, 2, 0, 1]  # warmup calls, then the timed ones, each cycling from the start


def test_measure_infers_device_from_tensor_arguments():
    a = torch.ones(4)
    assert measure(torch.neg, iters=2, rotate=[(a,)]).iters == 2


def test_peak_memory_is_none_on_cpu():
    assert peak_memory(lambda: torch.ones(10), device="cpu") is None


@pytest.mark.gpu
def test_cuda_timing_and_peak_memory():
    a = torch.randn(1024, 1024, device="cuda")
    t = measure(lambda: a @ a, iters=5)
    assert t.median_ms > 0
    assert peak_memory(lambda: torch.empty(64 << 20, dtype=torch.uint8, device="cuda")) >= 64 << 20


def test_cpu_ceilings_are_positive():
    c = measure_ceilings("cpu")
    assert set(c) == {"fp32_matmul_gflops", "copy_gb_s"} and all(v > 0 for v in c.values())


def timing(ms: float) -> Timing:
    return Timing(median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, min_ms=ms * 0.8, iters=10, spread=0.2)


def test_row_speedup_share_and_throughput():
    ceilings = {"bf16_matmul_tflops": 790.0, "copy_tb_s": 3.0}
    r = row("kernels", "project_fuse", {"batch": 8}, timing(1.0), timing(2.0), reference_name="release-style",
            flops=481e9, ceilings=ceilings, samples_per_s=8000.0)
    assert r["speedup"] == 2.0 and r["share_of_ceiling"] == pytest.approx(0.609, abs=1e-3)
    assert r["reference"] == {"name": "release-style", "median_ms": 2.0, "p20_ms": 1.8, "p80_ms": 2.2}
    assert r["samples_per_s"] == 8000.0
    memory_bound = row("kernels", "pool", {}, timing(1.0), bytes=1.5e9, ceilings=ceilings)
    assert memory_bound["share_of_ceiling"] == 0.5 and "speedup" not in memory_bound
    with pytest.raises(TypeError, match="bogus"):
        row("kernels", "x", {}, timing(1.0), bogus=1.0)


def test_results_file_layout_append_and_resume(tmp_path):
    path = results_path(tmp_path, "kernels", date="2026-12-01", slug="h100")
    assert path.name == "2026-12-01_h100_kernels.json"
    versions = {"merv_fast": "abc", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "driver": "580.1"}
    results = ResultsFile.create(path, command="merv-fast gpu-suite", device="NVIDIA H100 80GB HBM3",
                                 ceilings={"bf16_matmul_tflops": 790.0, "copy_tb_s": 3.0}, versions=versions)
    results.append(row("kernels", "a", {"batch": 8}, timing(1.0), timing(2.0)))
    # Reopening appends (resume); measuring the same row again replaces it.
    again = ResultsFile.open(path)
    again.append(row("kernels", "b", {"batch": 8}, timing(3.0)))
    again.append(row("kernels", "a", {"batch": 8}, timing(0.5), timing(2.0)))
    data = json.loads(path.read_text())
    assert list(data) == ["device", "date", "command", "versions", "ceilings", "results"]
    assert data["versions"] == versions and data["device"] == "NVIDIA H100 80GB HBM3"
    assert [(r["name"], r["ours"]["median_ms"]) for r in data["results"]] == [("b", 3.0), ("a", 0.5)]
    assert data["results"][1]["speedup"] == 4.0
    md = path.with_suffix(".md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "merv-fast gpu-suite" in md and "| kernels | a | batch=8 |" in md
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries behind


def test_results_table_markdown(tmp_path):
    paths = []
    for slug in ("h100", "cpu-2core"):
        results = ResultsFile.create(tmp_path / f"2026-12-01_{slug}_x.json", command="c", device=slug,
                                     versions={})
        results.append(row("kernels", f"op on {slug}", {}, timing(1.0), timing(3.0)))
        paths.append(results.path)
    table = results_table_markdown(paths).splitlines()
    assert table[0].startswith("| device | date | area | name |") and len(table) == 4
    date = json.loads(paths[0].read_text())["date"]
    assert f"| h100 | {date} | kernels | op on h100 |" in table[2] and "| 3.0 |" in table[2]
    assert table[2].endswith("| [2026-12-01_h100_x](bench/results/2026-12-01_h100_x.md) |")


def test_readme_table_cuts_long_cells_and_leaves_the_config_to_the_results_file(tmp_path):
    results = ResultsFile.create(tmp_path / "2026-12-01_cpu-2core_x.json", command="c", device="cpu", versions={})
    results.append(row("data", "n" * 200, {"every": "x" * 500}, timing(1.0), timing(3.0)))
    line = results_table_markdown([results.path]).splitlines()[2]
    assert "x" * 20 not in line and "n" * 71 + "…" in line and "n" * 72 not in line


def test_device_slug_here():
    slug = device_slug()
    assert re.fullmatch(r"cpu-\d+core|[0-9a-z-]+", slug)
    assert device_slug("cpu").startswith("cpu-") and device_slug("cpu").endswith("core")
