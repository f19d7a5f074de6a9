"""GPU-suite area `data`: frames/s of model-ready input per decode+preprocess backend, against the release's loader.

Backends, all on the same synth clips written into a temp dir, all producing every encoder's input
[B, T_e, 3, S, S] for the batch (frames_per_s counts the 32 sampled frames per video):
- `cpu-decode+native`: merv_fast.data.decode (PyAV / torchcodec) + merv_fast.kernels.preprocess.preprocess (the native
  C++/OpenMP op where built, the torch reference otherwise);
- `cpu-decode+gpu-preprocess`: the same decode, uint8 frames pinned and copied to the GPU, preprocessed there;
- `dali-mixed`: merv_fast.data.dali on the GPU (NVDEC + GPU resize/normalise);
- `dali-cpu`: DALI's CPU operators (only where every clip is VP8/VP9/MJPEG);
- `release`: merv_fast.data.release_loader (decord + PIL per frame), the reference of every speedup.
Full size on a GPU (the merv-7b encoders, 224x224, 32 frames; 320x240..640x480 clips); tiny on a CPU run.
`bench/bench_decode.py` uses the same backends under pytest-benchmark.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from merv_fast.config import EncoderConfig, get_preset
from merv_fast.measure.results import ResultsFile, row
from merv_fast.measure.suite import register_area
from merv_fast.measure.timing import summarize

CUDA = torch.cuda.is_available()
FRAMES_SAMPLED = 32

Backend = Callable[[Sequence[str], Sequence[Sequence[int]], Sequence[bool]], list[torch.Tensor]]


# ----------------------------------------------------------------------------------------------- clips
def make_clips(out: str | Path, *, tiny: bool, codecs: Sequence[str] | None = None) -> list[tuple[str, list[int]]]:
    """Write synth clips; returns (path, the spec's 32 sampled indices). Default codecs: VP9 + MJPEG (every
    backend, DALI's CPU decoder included, can read them); on a GPU H.264 + VP9 (NVDEC's usual diet)."""
    from merv_fast.data.synth import VideoSpec, write_video

    codecs = list(codecs or (("h264", "vp9") if CUDA else ("vp9", "mjpeg")))
    suffix = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}
    sizes = [(96, 72, 40), (112, 84, 36)] if tiny else [(320, 240, 90), (480, 360, 120), (640, 480, 150)]
    clips = []
    for k, (w, h, n) in enumerate(sizes):
        for codec in codecs:
            path = Path(out) / f"clip{k}_{codec}{suffix[codec]}"
            write_video(path, VideoSpec(path.stem, codec, w, h, n, fps=30.0, gop=30), seed=k)
            clips.append((str(path), sample_indices(n, 30.0)))
    return clips


def sample_indices(num_frames: int, fps: float) -> list[int]:
    try:
        from merv_fast.data.frames import sample_frame_indices

        return [int(i) for i in sample_frame_indices(num_frames, fps, count=FRAMES_SAMPLED)]
    except ImportError:
        return [int(i) for i in np.linspace(0, num_frames - 1, FRAMES_SAMPLED).astype(int)]


def _encoders(tiny: bool) -> list[EncoderConfig]:
    """Full-size preprocessing specs (224, 16/32 frames) even at tiny scale: the work per frame is what counts;
    tiny only shrinks the clips and their number."""
    return list(get_preset("merv-7b").encoders)


# ----------------------------------------------------------------------------------------------- backends
def cpu_decode(path: str, indices: Sequence[int], decoder: str = "pyav") -> np.ndarray:
    """uint8 [T, H, W, 3] by merv_fast.data.decode when it is there, else PyAV directly."""
    try:
        from merv_fast.data.decode import decode_video
    except ImportError:
        decode_video = None
    if decode_video is not None:
        frames = decode_video(path, list(indices), decoder=decoder)
        return frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if decoder != "pyav":
        raise RuntimeError(f"merv_fast.data.decode is not available for decoder {decoder!r}")
    from merv_fast.data.release_loader import decode_pyav

    return decode_pyav(path, indices)


def input_specs(encoders: Sequence[EncoderConfig], frames_sampled: int = FRAMES_SAMPLED):
    from merv_fast.kernels.preprocess import EncoderInputSpec

    return [EncoderInputSpec(size=e.image_size, resize=e.preprocess.resize, interpolation=e.preprocess.interpolation,
                             antialias=e.preprocess.antialias, mean=tuple(e.preprocess.mean),
                             std=tuple(e.preprocess.std), frame_stride=frames_sampled // e.frames,
                             random_flip=e.preprocess.random_flip) for e in encoders]


def _stack_decoded(paths, indices, decoder) -> torch.Tensor:
    """Same-size clips stack into [B, T, H, W, 3]; mixed sizes are preprocessed per sample by the callers."""
    return [torch.from_numpy(np.ascontiguousarray(cpu_decode(p, i, decoder))) for p, i in zip(paths, indices)]


def _preprocess(frames: torch.Tensor, encoders, flip: torch.Tensor) -> list[torch.Tensor]:
    """merv_fast.data.preprocess: the native op on CPU frames where it is usable, the torch reference otherwise."""
    from merv_fast.data.preprocess import preprocess_all

    return preprocess_all(frames, encoders, FRAMES_SAMPLED, flip)


def preprocess_note() -> str:
    try:
        import merv_fast.data.preprocess  # noqa: F401 - tells the op how to check the native library
        from merv_fast.kernels.preprocess import native_reason
    except ImportError:
        return "torch reference (kernels.preprocess absent)"
    why = native_reason()
    return "native C++/OpenMP op" if why is None else f"torch reference ({why})"


def backends(encoders: Sequence[EncoderConfig], batch_size: int, clips: Sequence[tuple[str, list[int]]]
             ) -> tuple[dict[str, Backend], dict[str, str]]:
    """{name: fn(paths, indices, flips) -> per-encoder tensors}, {name: why it is absent} for the missing ones."""
    fns: dict[str, Backend] = {}
    missing: dict[str, str] = {}

    def cpu_native(decoder):
        def run(paths, indices, flips):  # the trainer's batch preprocessing (mixed sizes written in place)
            from merv_fast.data.preprocess import preprocess_batch

            return preprocess_batch(_stack_decoded(paths, indices, decoder), encoders, FRAMES_SAMPLED,
                                    torch.tensor(flips))
        return run

    fns["cpu-decode(pyav)+native"] = cpu_native("pyav")
    try:
        import torchcodec  # noqa: F401
        from merv_fast.data.decode import decode_video  # noqa: F401
        fns["cpu-decode(torchcodec)+native"] = cpu_native("torchcodec")
    except Exception as err:  # noqa: BLE001
        missing["cpu-decode(torchcodec)+native"] = f"{type(err).__name__}: {str(err)[:200]}"

    if CUDA:
        def gpu_pre(paths, indices, flips):
            outs = []
            for frames, f in zip(_stack_decoded(paths, indices, "pyav"), flips):
                dev = frames.pin_memory().to("cuda", non_blocking=True)[None]
                outs.append(_preprocess(dev, encoders, torch.tensor([f], device="cuda")))
            res = [torch.cat(parts) for parts in zip(*outs)]
            torch.cuda.synchronize()
            return res
        fns["cpu-decode(pyav)+gpu-preprocess"] = gpu_pre
    else:
        missing["cpu-decode(pyav)+gpu-preprocess"] = "no CUDA device"

    from merv_fast.data import dali as D

    for device, name in (("gpu", "dali-mixed"), ("cpu", "dali-cpu")):
        ok, why = D.dali_available(device)
        if ok and device == "cpu" and not all(Path(p).suffix in (".webm", ".avi", ".mkv") for p, _ in clips):
            ok, why = False, "the clips include H.264, which DALI's CPU decoder cannot read"
        if not ok:
            missing[name] = why
            continue
        loader = D.DaliVideoLoader(encoders, batch_size, device=device,
                                   num_threads=max(1, min(8, os.cpu_count() or 1)))

        def run(paths, indices, flips, loader=loader):
            res = loader.run_batch(paths, indices, flips)
            if res and res[0].is_cuda:
                torch.cuda.synchronize()
            return res
        fns[name] = run

    from merv_fast.data.release_loader import ReleaseLoader

    release = ReleaseLoader(encoders, FRAMES_SAMPLED)
    fns["release"] = lambda paths, indices, flips: release.load_batch(paths, indices, flips)
    return fns, missing


# ----------------------------------------------------------------------------------------------- measuring
def time_backend(fn: Backend, clips, batch_size: int, repeats: int) -> list[float]:
    """ms per pass over all clips (batches of batch_size), `repeats` passes after one warm-up pass."""
    batches = [clips[i:i + batch_size] for i in range(0, len(clips), batch_size)]

    def one_pass():
        for b in batches:
            fn([c[0] for c in b], [c[1] for c in b], [k % 2 == 1 for k in range(len(b))])

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def data_area(results: ResultsFile, ceilings: dict) -> None:
    # MERV_FAST_SUITE_FULL=1 measures full-size clips on a CPU too (a CPU-only figure of record, minutes long)
    tiny = not CUDA and os.environ.get("MERV_FAST_SUITE_FULL") != "1"
    encoders = _encoders(tiny)
    batch_size, repeats = (2, 1) if tiny else (8, 3)
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(tmp, tiny=tiny)
        fns, missing = backends(encoders, batch_size, clips)
        frames = len(clips) * FRAMES_SAMPLED
        timings = {name: summarize(time_backend(fn, clips, batch_size, repeats)) for name, fn in fns.items()}
    ref = timings["release"]
    base = {"videos": len(clips), "frames_per_video": FRAMES_SAMPLED, "batch": batch_size,
            "encoders": [e.name for e in encoders], "codecs": sorted({Path(p).suffix for p, _ in clips}),
            "torch_threads": threads, "cpu_count": cores, "preprocess": preprocess_note(), "missing": missing}
    for name, timing in timings.items():
        fps = frames / (timing.median_ms / 1e3)
        config = {**base, "backend": name, "frames_per_s_per_core": round(fps / cores, 2)}
        if name == "release":
            from merv_fast.data.release_loader import release_available
            config["decoder_note"] = release_available()[1]
        results.append(row("data", f"decode+preprocess {name}", config, timing,
                           None if name == "release" else ref,
                           reference_name="release loader (decord + PIL per frame)", frames_per_s=fps))


import merv_fast.measure.gpu_areas  # noqa: E402,F401 - registers "encoders", which this area follows

register_area("data", data_area, budget_s=240, after="encoders")
