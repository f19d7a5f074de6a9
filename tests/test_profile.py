"""`merv-fast profile` on the tiny preset: traces, the per-phase table, the PNGs."""

import json

from merv_fast.cli import main
from merv_fast.measure.profile import ENCODER_PREFIX, _overlap, summarize_trace


def test_profile_tiny_writes_traces_table_and_plots(tmp_path, capfd):
    out = tmp_path / "prof"
    assert main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--text-tokens", "16",
                 "--out", str(out)]) == 0
    captured = capfd.readouterr()  # fd-level: the profiler library writes from C++
    printed = captured.out
    for preset in ("tiny", "single-tiny"):
        trace = json.loads((out / f"trace_{preset}.json").read_text())
        events = trace["traceEvents"]
        assert len(events) > 100
        names = {e.get("name") for e in events}
        assert {"phase:data", "phase:backward", "phase:optimizer", "pooling", "merv_step"} <= names
    tiny_names = {e.get("name") for e in json.loads((out / "trace_tiny.json").read_text())["traceEvents"]}
    assert {ENCODER_PREFIX + n for n in ("languagebind", "dinov2", "vivit", "siglip")} <= tiny_names

    for phase in ("data", "encoder languagebind", "encoder siglip", "pooling", "projection+fusion", "llm forward",
                  "backward", "optimizer", "step"):
        assert phase in printed
    assert "single-tiny ms" in printed
    report = json.loads((out / "profile.json").read_text())
    merv, base = report["merv"], report["baseline"]
    assert merv["step_ms"] > 0 and base["step_ms"] > 0
    shares = sum(p["share"] for p in merv["phases"])
    assert 0.99 < shares < 1.01 or shares > 1.0  # every phase accounted for ("other" closes the gap)
    assert {p["phase"] for p in base["phases"]} >= {"encoder languagebind", "backward"}
    assert not any(p["phase"].startswith("encoder dinov2") for p in base["phases"])
    assert merv["encoder_intervals"]["overlap_ms_per_step"]["host"] == 0.0  # sequential encoders
    vivit = merv["encoder_intervals"]["lanes"]["host"]["vivit"]
    assert [step for _, _, step in vivit] == [0, 1]  # one range per profiled step, each tagged with its step
    assert all(0 <= start < end <= merv["step_ms"] * 2 for start, end, _ in vivit)
    assert "USDT" not in printed + captured.err

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["encoders_timeline_single-tiny.png", "encoders_timeline_tiny.png",
                    "phases_tiny_vs_single-tiny.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_overlap_counts_only_concurrent_different_encoders():
    assert _overlap([[0, 2], [2, 3]], ["a", "b"]) == 0
    assert _overlap([[0, 2], [1, 3], [1.5, 1.8]], ["a", "b", "b"]) == 1
    assert _overlap([[0, 2], [1, 3]], ["a", "a"]) == 0


def test_summary_prefers_device_ranges():
    def ev(name, ts, dur, cat="user_annotation"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        ev("merv_step", 0, 10000), ev("phase:data", 0, 1000), ev("phase:encoders", 1000, 4000),
        ev("encoder:a", 1000, 2000), ev("encoder:b", 3000, 2000), ev("phase:visual", 5000, 1000),
        ev("pooling", 5000, 400), ev("phase:backward", 6000, 3000),
        ev("encoder:a", 1500, 3000, "gpu_user_annotation"), ev("encoder:b", 3500, 2000, "gpu_user_annotation"),
        ev("ncclDevKernel_AllReduce", 9000, 500, "kernel")]}
    s = summarize_trace(trace, steps=1, encoders=["a", "b"])
    phases = {p["phase"]: p["ms_per_step"] for p in s["phases"]}
    assert s["source"] == "device" and s["step_ms"] == 10.0
    assert phases["encoder a"] == 3.0 and phases["pooling"] == 0.4 and abs(phases["projection+fusion"] - 0.6) < 1e-9
    assert phases["communication"] == 0.5
    assert s["encoder_intervals"]["overlap_ms_per_step"] == {"host": 0.0, "device": 1.0}
