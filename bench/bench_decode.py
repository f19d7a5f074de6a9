"""pytest-benchmark suite: decode + preprocess frames/s per backend, against the release-style loader (decord + PIL
per frame), on the same synth clips in the same run.

Backends (merv_fast.measure.data_areas.backends): PyAV and torchcodec decoding + merv_fast's preprocessing (native
op where built), DALI CPU (VP9/MJPEG clips) and DALI mixed on a GPU, and `release`. Each test records
extra_info: frames_per_s, frames_per_s_per_core (os.cpu_count), torch_threads, cpu_count, and `missing` names the
backends that could not run here and why. CI: tiny clips, run once as tests (`--benchmark-disable`).
Measure: `python -m pytest bench/bench_decode.py --benchmark-enable --benchmark-json out.json`
(MERV_BENCH_FULL=1 for the full-size clips on a CPU machine).
"""

import os

import pytest
import torch

from merv_fast.measure import data_areas as A

FULL = A.CUDA or os.environ.get("MERV_BENCH_FULL") == "1"
BATCH = 4 if FULL else 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    clips = A.make_clips(tmp_path_factory.mktemp("decode_bench"), tiny=not FULL)
    encoders = A._encoders(tiny=not FULL)
    fns, missing = A.backends(encoders, BATCH, clips)
    return clips, fns, missing


BACKENDS = ["cpu-decode(pyav)+native", "cpu-decode(torchcodec)+native", "cpu-decode(pyav)+gpu-preprocess",
            "dali-cpu", "dali-mixed", "release"]


@pytest.mark.parametrize("name", BACKENDS)
def test_decode_preprocess(benchmark, setup, name):
    clips, fns, missing = setup
    if name not in fns:
        pytest.skip(f"{name}: {missing.get(name, 'not available here')}")
    fn = fns[name]
    batches = [clips[i:i + BATCH] for i in range(0, len(clips), BATCH)]
    out = {}

    def one_pass():
        for b in batches:
            out["last"] = fn([c[0] for c in b], [c[1] for c in b], [k % 2 == 1 for k in range(len(b))])

    benchmark.pedantic(one_pass, rounds=3 if FULL else 1, iterations=1, warmup_rounds=1 if FULL else 0)
    frames = len(clips) * A.FRAMES_SAMPLED
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    if seconds is None:  # --benchmark-disable: time one pass ourselves
        seconds = min(A.time_backend(fn, clips, BATCH, 1)) / 1e3
    cores = os.cpu_count() or 1
    benchmark.extra_info.update(frames_per_s=frames / seconds, frames_per_s_per_core=frames / seconds / cores,
                                torch_threads=torch.get_num_threads(), cpu_count=cores, videos=len(clips),
                                preprocess=A.preprocess_note(), missing=missing)
    last = out["last"]
    assert [tuple(t.shape[1:]) for t in last] == [(e.frames, 3, e.image_size, e.image_size)
                                                  for e in A._encoders(not FULL)]
