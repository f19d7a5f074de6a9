"""Decoding videos and images into uint8 RGB tensors: the API the datasets and `data check` use.

Backends (`--decoder auto|dali|torchcodec|pyav`), all CPU here:
- torchcodec: where it imports and decodes (a probe clip is decoded once per process to prove it); `auto` prefers it.
- pyav: always there (a dependency of the `video` extra); the fallback.
- dali: NVIDIA DALI's GPU pipeline is a later step; reported, never chosen, until it exists.
Both CPU backends give index i the same meaning (the i-th frame in presentation order, from a packet scan) and agree
exactly on even-sized H.264/VP9/MJPEG (odd-width 4:2:0 frames differ by a few levels in chroma rounding).

Every broken input raises MediaError(path, reason); `timeout_s` bounds a call from outside (media_worker.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from merv_fast.data import pyav_backend
from merv_fast.data.media_types import MediaError, VideoInfo
from merv_fast.data.media_worker import load_media_with_timeout, stop_worker

__all__ = ["MediaError", "VideoInfo", "resolve_media_path", "probe_video", "decode_video", "decode_image",
           "decode_video_sampled", "available_decoders", "choose_decoder", "load_media_with_timeout", "stop_worker",
           "DECODERS"]

DECODERS = ("auto", "dali", "torchcodec", "pyav")


def resolve_media_path(media_root: str | Path, relative: str | Path) -> Path:
    """`media_root / relative`, refusing absolute paths and anything that resolves (symlinks included) outside
    the media root."""
    relative = Path(relative)
    if relative.is_absolute():
        raise MediaError(relative, "outside the media root (an absolute path)")
    root = Path(media_root).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise MediaError(relative, f"outside the media root (resolves to {path})")
    return path


# ------------------------------------------------------------------------------------------------------ backends
def _torchcodec_status() -> tuple[bool, str]:
    try:
        import torchcodec  # noqa: F401
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as err:  # a torchcodec built for other FFmpeg/torch libraries fails with OSError/RuntimeError
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return False, f"does not import: {type(err).__name__}: {first_line}"
    return _torchcodec_decodes()


@functools.lru_cache(maxsize=1)
def _torchcodec_decodes() -> tuple[bool, str]:
    """Decode a tiny clip made here: a torchcodec that imports can still fail on the first decode."""
    import tempfile

    import numpy as np

    from merv_fast.data import synth, torchcodec_backend

    try:
        with tempfile.TemporaryDirectory(prefix="merv_fast_probe_") as tmp:
            path = synth.write_video(Path(tmp) / "probe.mp4", synth.VideoSpec("probe", "h264", 32, 32, 3))
            ok = np.array_equal(torchcodec_backend.read_frames(path, [2, 0]), pyav_backend.read_frames(path, [2, 0]))
    except Exception as err:
        return False, f"imports, but failed a test decode: {type(err).__name__}: {str(err)[:200]}"
    if not ok:
        return False, "imports, but its frames differ from PyAV's on a test clip"
    import torchcodec

    return True, f"torchcodec {torchcodec.__version__} imports and decodes"


def _pyav_status() -> tuple[bool, str]:
    try:
        import av
    except Exception as err:
        return False, f"PyAV does not import: {type(err).__name__}: {err}"
    return True, f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})"


def _dali_status() -> tuple[bool, str]:
    from merv_fast.env import probe_package

    info = probe_package("nvidia.dali", needs_cuda=True)
    if not info["available"]:
        return False, f"nvidia.dali does not import ({info['why']})"
    from merv_fast.data.dali import dali_available

    return dali_available("gpu")


@functools.lru_cache(maxsize=1)
def available_decoders() -> dict[str, tuple[bool, str]]:
    """{name: (usable, why)} for every backend but `auto`."""
    return {"dali": _dali_status(), "torchcodec": _torchcodec_status(), "pyav": _pyav_status()}


def choose_decoder(requested: str = "auto") -> tuple[str, str]:
    """(backend name, why). `auto`: PyAV, else torchcodec: on 320x240 H.264 and VP9 clips PyAV decoded 1.2-1.3x
    faster per core than torchcodec 0.13 here; torchcodec only won on tiny clips. DALI decodes whole batches on the
    GPU through `merv_fast.data.dali.DaliVideoLoader`, so per-file `auto` never picks it. A named backend that is
    not usable raises ValueError with its reason."""
    if requested not in DECODERS:
        raise ValueError(f"unknown decoder {requested!r}; choose one of {', '.join(DECODERS)}")
    status = available_decoders()
    if requested != "auto":
        usable, why = status[requested]
        if not usable:
            raise ValueError(f"decoder {requested!r} is not usable here: {why}")
        return requested, why
    for name in ("pyav", "torchcodec"):
        usable, why = status[name]
        if usable:
            skipped = "" if name == "pyav" else f"; pyav: {status['pyav'][1]}"
            return name, f"auto: {why}{skipped}"
    raise ValueError(f"no video decoder is usable: {status}")


def _backend(name: str):
    """The module of a chosen backend (resolved in the worker: modules do not pickle, names do)."""
    if name == "dali":
        from merv_fast.data import dali as dali_backend

        return dali_backend
    if name == "torchcodec":
        from merv_fast.data import torchcodec_backend

        return torchcodec_backend
    return pyav_backend


# ------------------------------------------------------------------------------------------------------- decoding
def probe_video(path: str | Path, decoder: str = "auto", timeout_s: float | None = None) -> VideoInfo:
    """Frame count (what the decoder can produce), average fps, displayed size, rotation, codec and duration."""
    return load_media_with_timeout(_probe, str(path), choose_decoder(decoder)[0], timeout_s=timeout_s)


def decode_video(path: str | Path, indices: list[int], decoder: str = "auto",
                 timeout_s: float | None = None) -> torch.Tensor:
    """uint8 [len(indices), H, W, 3] RGB, rotation applied, in the order given (repeats decoded once)."""
    indices = [int(i) for i in indices]
    frames = load_media_with_timeout(_read_frames, str(path), indices, choose_decoder(decoder)[0],
                                     timeout_s=timeout_s)
    return torch.from_numpy(frames)


# Module-level, path first (a time-out names args[0]), the backend by name: what the worker process runs.
def _probe(path: str, backend: str) -> VideoInfo:
    return _backend(backend).probe(path)


def _read_frames(path: str, indices: list[int], backend: str):
    return _backend(backend).read_frames(path, indices)


def _probe_sample_read(path: str, backend: str, count: int, start_s, end_s, end_frame=None):
    from merv_fast.data.frames import sample_frame_indices

    info = _backend(backend).probe(path)
    indices = sample_frame_indices(info.num_frames, info.fps, count, start_s, end_s, end_frame)
    return _backend(backend).read_frames(path, indices), indices, info


def decode_video_sampled(path: str | Path, count: int = 32, start_s: float | None = None, end_s: float | None = None,
                         decoder: str = "auto", timeout_s: float | None = None, end_frame: int | None = None
                         ) -> tuple[torch.Tensor, list[int], VideoInfo]:
    """Probe, sample `count` indices (spec section 1; `end_frame` as `frames.sample_frame_indices`) and decode them
    in one call (one worker round trip, and PyAV's packet scan is shared): (frames, indices, info)."""
    frames, indices, info = load_media_with_timeout(_probe_sample_read, str(path), choose_decoder(decoder)[0], count,
                                                    start_s, end_s, end_frame, timeout_s=timeout_s)
    return torch.from_numpy(frames), indices, info


def decode_image(path: str | Path, timeout_s: float | None = None) -> torch.Tensor:
    """uint8 [H, W, 3] RGB: EXIF orientation applied, grayscale replicated, alpha dropped (as PIL's convert)."""
    return torch.from_numpy(load_media_with_timeout(pyav_backend.read_image, str(path), timeout_s=timeout_s))
