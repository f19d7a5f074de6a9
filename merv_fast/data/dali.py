"""NVIDIA DALI pipelines (videos and images): encoded bytes -> every encoder's model-ready input.

    ok, why = dali_available()
    loader = DaliVideoLoader(cfg.encoders, batch_size=8, device="auto")   # "gpu" (NVDEC, "mixed") | "cpu"
    inputs = loader.run_batch(paths, indices, flips)       # list (encoder order) of torch [B, T_e, 3, S, S]
    for inputs in loader.iterate(samples): ...              # samples: (path, indices[, flip]) triples

    images = DaliImageLoader(cfg.encoders, batch_size=32).run_batch(jpeg_bytes_or_paths, flips)  # [B, 1, 3, S, S]

DALI is optional: nothing here imports it at module import; `dali_available()` says why it cannot be used.

The graph, per batch: `external_source` feeds each sample's encoded file bytes (uint8 [n]) and its frame indices
(int32 [32], the spec's sampled indices, see merv_fast.data.frames); `fn.decoders.video(frames=...)` decodes exactly
those frames (device "mixed" = NVDEC on a GPU for H.264/HEVC/VP9/AV1/MPEG-4; device "cpu" = libavcodec for
VP8/VP9/MJPEG only). Then per encoder (encoders with the same frame stride and resize share one resize):
`fn.sequence_rearrange` takes every stride-th frame, `fn.resize` (dtype float, no uint8 rounding in between) squashes
or resizes the short side to the sizes the torch reference computes (fed per sample: they depend on the frame size),
and `fn.crop_mirror_normalize` center-crops at the reference's offsets, mirrors the samples whose flip flag is set
(LanguageBind, an input per sample), normalises with the spec's mean/std and writes [T_e, 3, S, S] float32 or
float16. bf16 is not a DALI output type: it is produced by a cast in torch after the DLPack hand-over.

Images (`DaliImageLoader`, `build_image_pipeline`): `fn.decoders.image` ("mixed" = nvJPEG on a GPU) decodes each
file to RGB, the image becomes a one-frame sequence and goes through the same per-encoder graph (`_encoder_outputs`);
each encoder gets ONE frame, [B, 1, 3, S, S], which the caller expands along time (an image is a static video).

Semantics are those of merv_fast.data.preprocess (the torch reference). Where DALI differs (measured on CPU by
tests/data/test_dali.py against the reference on the same decoded frames, values in normalised units, i.e. after
(x - mean) / std; divide by 1/std to get [0, 1] units):
- bilinear without antialias (LanguageBind): the same 2-tap filter; max |diff| <= 2e-4 (float rounding).
- bilinear with antialias (ViViT): DALI's antialiased linear filter is the same triangle of support = scale as
  torch's (and PIL's); max |diff| <= 0.007 normalised (<= 0.9/255 in [0, 1] units), mean < 1e-5.
- bicubic with antialias (DINOv2, SigLIP): DALI's cubic is Keys a = -0.5 with the support scaled when downscaling,
  like torch's antialiased bicubic; max |diff| <= 0.007 normalised (<= 0.4/255 in [0, 1] units), mean < 3e-5.
  Measured on 320x240, 322x238, 240x320 (downscale) and 160x120 (upscale) clips; DALI_TOLERANCE holds the bounds
  the tests enforce (about 4x the worst measured).
- decoded pixels: DALI's YUV->RGB conversion is not libswscale's (PyAV/decord): on VP9/MJPEG clips the frames differ
  by ~1-2 uint8 levels on average (a bias of about +1 level), a few tens at sharp chroma edges. Frame selection is
  exact (the requested indices, in display order).
- DALI ignores rotation metadata; the video's frame count must cover the indices (pad_mode is not used with
  `frames`). Broken files raise DaliDecodeError naming the files (each sample of a failed batch is retried alone to
  find which).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merv_fast.config import EncoderConfig
from merv_fast.kernels.preprocess import short_side_geometry

# Largest deviation from the torch reference (normalised units) the tests accept, per (interpolation, antialias).
DALI_TOLERANCE = {("bilinear", False): {"max": 1e-3, "mean": 1e-5},
                  ("bilinear", True): {"max": 0.03, "mean": 1e-4},
                  ("bicubic", True): {"max": 0.03, "mean": 1e-4},
                  ("bicubic", False): {"max": 0.03, "mean": 1e-4}}
# Decoded frames vs PyAV (libswscale) at the same indices, uint8 levels (YUV->RGB conversion differs).
DECODE_TOLERANCE = {"mean_abs": 3.0}
# Decoded images vs Pillow (`Image.open(...).convert("RGB")`, EXIF transposed: merv_fast.data.decode.decode_image),
# uint8 levels. PNG is lossless: exact on every device. JPEG: IDCT and chroma upsampling are the decoder's choice;
# DALI's CPU decoder (libjpeg-turbo, as Pillow's) measured bit-exact on the synthetic baseline 4:2:0 JPEGs of
# tests/data/test_dali_images.py; other libjpeg variants (nvJPEG on a GPU) may differ by a level or two, more at
# sharp chroma edges, hence a bound on the mean and a loose one on the maximum.
IMAGE_DECODE_TOLERANCE = {"png": {"max_abs": 0, "mean_abs": 0.0}, "jpeg": {"max_abs": 32, "mean_abs": 2.0}}
CPU_CODECS = ("vp8", "vp9", "mjpeg")
GPU_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg")


class DaliDecodeError(RuntimeError):
    """A batch DALI could not decode; `bad` maps each path that failed alone to its error text."""

    def __init__(self, message: str, bad: dict[str, str] | None = None):
        super().__init__(message)
        self.bad = bad or {}


# ----------------------------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _import_dali() -> tuple[Any, str | None]:
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types  # noqa: F401
    except Exception as err:  # missing wheel, missing CUDA libs, a broken install
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"nvidia.dali does not import ({type(err).__name__}: {text[:200]}); " \
                     "install e.g. `pip install nvidia-dali-cuda130`"
    return dali, None


def dali_available(device: str = "cpu", media: str = "video") -> tuple[bool, str]:
    """(usable, reason). device "cpu": DALI imports (its CPU video decoder: VP8/VP9/MJPEG only; its CPU image
    decoder: JPEG, PNG and the other still formats); device "gpu": DALI imports and torch sees a CUDA device (NVDEC
    video decoding / nvJPEG image decoding, "mixed"). `media` ("video" | "image") only changes the reason's words."""
    if media not in ("video", "image"):
        raise ValueError(f"media {media!r}: expected video | image")
    dali, why = _import_dali()
    if dali is None:
        return False, why
    version = dali.__version__
    if device == "gpu":
        decoder = "NVDEC" if media == "video" else "nvJPEG"
        if not torch.cuda.is_available():
            return False, f"DALI {version} imports, but no CUDA device is visible (mixed/{decoder} decoding needs one)"
        return True, f"DALI {version}, GPU {torch.cuda.get_device_name()} (mixed: {decoder} decode, GPU preprocessing)"
    if media == "image":
        return True, f"DALI {version} on the CPU (its CPU image decoder: JPEG/PNG/BMP/TIFF/WebP...)"
    return True, f"DALI {version} on the CPU (its CPU video decoder handles {'/'.join(CPU_CODECS)} only)"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if dali_available("gpu")[0] else "cpu"
    if device not in ("cpu", "gpu", "mixed"):
        raise ValueError(f"device {device!r}: expected auto | cpu | gpu")
    return "gpu" if device == "mixed" else device


# ----------------------------------------------------------------------------------------------- geometry
def crop_pos(offset: int, excess: int) -> float:
    """DALI's crop anchor is crop_pos * (in - crop): a quarter pixel past the wanted offset lands on it whether DALI
    rounds or truncates the product."""
    return 0.0 if excess <= 0 else (offset + 0.25) / excess


@functools.lru_cache(maxsize=4096)
def probe_size(path: str) -> tuple[int, int]:
    """(height, width) of the first video stream, as coded (DALI ignores rotation metadata)."""
    import av

    with av.open(path) as container:
        ctx = container.streams.video[0].codec_context
        return int(ctx.height), int(ctx.width)


@dataclass(frozen=True)
class _Branch:
    """Encoders sharing one resize: same frame stride, mode, filter, antialias and size."""

    stride: int
    resize: str
    interpolation: str
    antialias: bool
    size: int


def _branch(enc: EncoderConfig, frames_sampled: int, single_frame: bool = False) -> _Branch:
    """Its resize branch; with a single frame (an image) the stride means nothing, so all strides share one."""
    p = enc.preprocess
    if p.resize not in ("squash", "short_side_crop") or p.letterbox:
        raise ValueError(f"encoder {enc.name!r}: the DALI loader builds squash and short_side_crop resizes only, not "
                         f"{p.strategy!r} ({p.resize}{', letterbox' if p.letterbox else ''}); use the native or torch "
                         f"loader")
    stride = 1 if single_frame else frames_sampled // enc.frames
    return _Branch(stride, p.resize, p.interpolation, p.antialias, enc.image_size)


def _branch_ids(encoders: Sequence[EncoderConfig], frames_sampled: int, single_frame: bool = False
                ) -> dict[_Branch, int]:
    """Branch -> k, the suffix of its external sources, in the order `_encoder_outputs` numbers them."""
    ids: dict[_Branch, int] = {}
    for enc in encoders:
        ids.setdefault(_branch(enc, frames_sampled, single_frame), len(ids))
    return ids


def _feed_geometry(pipe, branches: dict[_Branch, int], sizes: Sequence[tuple[int, int]]) -> None:
    """Each short_side_crop branch's per-sample resize target and crop position, from the (H, W) of every sample
    (the torch reference's integer geometry, computed on the host)."""
    for br, k in branches.items():
        if br.resize != "short_side_crop":
            continue
        geo = [short_side_geometry(h, w, br.size) for h, w in sizes]
        pipe.feed_input(f"rx{k}", [np.array(g[1], dtype=np.float32) for g in geo])
        pipe.feed_input(f"ry{k}", [np.array(g[0], dtype=np.float32) for g in geo])
        pipe.feed_input(f"cx{k}", [np.array(crop_pos(g[3], g[1] - br.size), dtype=np.float32) for g in geo])
        pipe.feed_input(f"cy{k}", [np.array(crop_pos(g[2], g[0] - br.size), dtype=np.float32) for g in geo])


# ----------------------------------------------------------------------------------------------- the pipeline
def _new_pipeline(batch_size: int, device: str, num_threads: int | None, device_id: int, out_dtype: torch.dtype):
    """(an empty DALI pipeline, the resolved device "cpu" | "gpu", DALI's output type for `out_dtype`)."""
    dali, why = _import_dali()
    if dali is None:
        raise RuntimeError(why)
    from nvidia.dali import types

    device = resolve_device(device)
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError(dali_available("gpu")[1])
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype {out_dtype}: float32, float16 or bfloat16 (bf16 is cast in torch)")
    dali_out = types.FLOAT16 if out_dtype == torch.float16 else types.FLOAT
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=threads,
                         device_id=device_id if device == "gpu" else None,
                         prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    return pipe, device, dali_out


def build_pipeline(encoders: Sequence[EncoderConfig], *, batch_size: int, device: str = "cpu",
                   frames_sampled: int = 32, num_threads: int | None = None, device_id: int = 0,
                   out_dtype: torch.dtype = torch.float32, decode_only: bool = False):
    """A built DALI pipeline. External sources (fed by `DaliVideoLoader`): "encoded" uint8 [n], "frames" int32
    [frames_sampled], "flip" int32 scalar, and per short_side_crop branch k: "rx{k}", "ry{k}" (resized width/height),
    "cx{k}", "cy{k}" (crop positions). Outputs: one per encoder, [T_e, 3, S, S] ("FCHW"), or the decoded frames
    [T, H, W, 3] uint8 when decode_only."""
    pipe, device, dali_out = _new_pipeline(batch_size, device, num_threads, device_id, out_dtype)
    from nvidia.dali import fn, types

    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, frames=indices, device="mixed" if device == "gpu" else "cpu")
        if decode_only:
            pipe.set_outputs(video)
            return pipe
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        pipe.set_outputs(*_encoder_outputs(video, encoders, frames_sampled, flip, dali_out))
    return pipe


def _encoder_outputs(frames: Any, encoders: Sequence[EncoderConfig], frames_sampled: int, flip: Any, dali_out: Any,
                     single_frame: bool = False) -> list[Any]:
    """The per-encoder graph shared by the video and the image pipelines: decoded frames ("FHWC" uint8, on the
    pipeline's device) -> one output per encoder, [T_e, 3, S, S] ("FCHW"). Encoders of one `_Branch` share a resize
    (and, for short_side_crop, the external sources "rx{k}", "ry{k}", "cx{k}", "cy{k}": see `_feed_geometry`).
    `single_frame`: the input holds ONE frame (an image), nothing is strided and each output is [1, 3, S, S]."""
    from nvidia.dali import fn, types

    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
    branches: dict[_Branch, tuple[Any, int]] = {}
    outputs = []
    for enc in encoders:
        br = _branch(enc, frames_sampled, single_frame)
        if br not in branches:
            x = frames
            if br.stride > 1:
                x = fn.sequence_rearrange(x, new_order=list(range(0, frames_sampled, br.stride)))
            k = len(branches)
            if br.resize == "squash":
                x = fn.resize(x, resize_x=float(br.size), resize_y=float(br.size), interp_type=interp[br.interpolation],
                              antialias=br.antialias, dtype=types.FLOAT, subpixel_scale=False)
            elif br.resize == "short_side_crop":
                rx = fn.external_source(name=f"rx{k}", dtype=types.FLOAT, ndim=0)
                ry = fn.external_source(name=f"ry{k}", dtype=types.FLOAT, ndim=0)
                x = fn.resize(x, resize_x=rx, resize_y=ry, interp_type=interp[br.interpolation],
                              antialias=br.antialias, dtype=types.FLOAT, subpixel_scale=False)
            else:
                raise ValueError(f"encoder {enc.name!r}: unknown resize mode {br.resize!r}")
            branches[br] = (x, k)
        x, k = branches[br]
        p = enc.preprocess
        crop: dict[str, Any] = {}
        if br.resize == "short_side_crop":
            crop = dict(crop=(br.size, br.size),
                        crop_pos_x=fn.external_source(name=f"cx{k}", dtype=types.FLOAT, ndim=0),
                        crop_pos_y=fn.external_source(name=f"cy{k}", dtype=types.FLOAT, ndim=0))
        outputs.append(fn.crop_mirror_normalize(
            x, mirror=flip if p.random_flip else 0, mean=[255.0 * m for m in p.mean],
            std=[255.0 * s for s in p.std], output_layout="FCHW", dtype=dali_out, **crop))
    return outputs


def _to_torch(out: Any, clone: bool = True) -> torch.Tensor:
    """A DALI TensorList (dense) -> torch via DLPack; cloned, since DALI reuses its buffers on the next run."""
    tensor = out.as_tensor()
    t = torch.from_dlpack(tensor)
    return t.clone() if clone else t


def _outputs_to_torch(outs: Sequence[Any], out_dtype: torch.dtype) -> list[torch.Tensor]:
    """A pipeline run's outputs -> torch tensors (bf16, not a DALI type, is cast here)."""
    tensors = [_to_torch(o) for o in outs]
    if out_dtype == torch.bfloat16:
        tensors = [t.to(torch.bfloat16) for t in tensors]
    return tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _read_bytes(path: str | os.PathLike) -> np.ndarray:
    return np.fromfile(str(path), dtype=np.uint8)


def _run_naming_failures(run, device: str, keys: Sequence[str], samples: Sequence[tuple]) -> list[torch.Tensor]:
    """run(*columns of samples) for the batch; when it fails, each sample is run alone to name the ones that fail
    (by key: a path, or "#i" for in-memory bytes) in the DaliDecodeError raised."""
    try:
        return run(*map(list, zip(*samples)))
    except (RuntimeError, IndexError, OSError) as err:
        bad = {}
        for key, sample in zip(keys, samples):
            try:
                run(*([v] for v in sample))
            except Exception as one:  # noqa: BLE001 - reported by key
                bad[key] = _first_line(one)
        raise DaliDecodeError(f"DALI ({device}) failed on {len(bad) or 'some'} of {len(keys)} files: "
                              f"{bad or str(err)[:300]}", bad) from err


class _DaliLoader:
    """What both loaders hold: the encoders' branches, the device and the lazily built pipeline. Subclasses set
    MEDIA ("video" | "image")."""

    MEDIA: str

    def __init__(self, encoders: Sequence[EncoderConfig], batch_size: int, *, device: str = "auto",
                 frames_sampled: int = 32, num_threads: int | None = None, device_id: int = 0,
                 out_dtype: torch.dtype = torch.float32, sizes: dict[str, tuple[int, int]] | None = None):
        self.device = resolve_device(device)
        ok, why = dali_available(self.device, media=self.MEDIA)
        if not ok:
            raise RuntimeError(why)
        self.encoders = list(encoders)
        self.batch_size = batch_size
        self.frames_sampled = frames_sampled
        self.num_threads = num_threads
        self.device_id = device_id
        self.out_dtype = out_dtype
        self.sizes = dict(sizes or {})
        self._branches = _branch_ids(self.encoders, frames_sampled, single_frame=self.MEDIA == "image")
        self._pipe = None


class DaliVideoLoader(_DaliLoader):
    """Batches of (path, frame indices, flip) -> per-encoder torch tensors [B, T_e, 3, S, S] (encoder order).

    device "gpu" decodes with NVDEC and preprocesses on the GPU (tensors come back on cuda); "cpu" uses DALI's CPU
    operators (VP8/VP9/MJPEG only). `sizes` (optional, path -> (H, W)) saves the PyAV probe of the frame size.
    """

    MEDIA = "video"

    # -- pipeline life cycle: a DALI pipeline is dead after a critical error, so it is rebuilt lazily
    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.encoders, batch_size=self.batch_size, device=self.device,
                                        frames_sampled=self.frames_sampled, num_threads=self.num_threads,
                                        device_id=self.device_id, out_dtype=self.out_dtype)
        return self._pipe

    def _size(self, path: str) -> tuple[int, int]:
        if path not in self.sizes:
            self.sizes[path] = probe_size(path)
        return self.sizes[path]

    def _feed(self, pipe, paths: Sequence[str], indices: Sequence[Sequence[int]], flips: Sequence[bool]) -> None:
        for idx in indices:
            if len(idx) != self.frames_sampled:
                raise ValueError(f"each sample needs {self.frames_sampled} frame indices, got {len(idx)}")
        pipe.feed_input("encoded", [_read_bytes(p) for p in paths])
        pipe.feed_input("frames", [np.asarray(i, dtype=np.int32) for i in indices])
        pipe.feed_input("flip", [np.array(int(bool(f)), dtype=np.int32) for f in flips])
        if any(br.resize == "short_side_crop" for br in self._branches):
            _feed_geometry(pipe, self._branches, [self._size(p) for p in paths])

    def _run(self, paths, indices, flips) -> list[torch.Tensor]:
        pipe = self._pipeline()
        try:
            self._feed(pipe, paths, indices, flips)
            outs = pipe.run()
        except Exception:
            self._pipe = None  # the pipeline is no longer valid after a critical error
            raise
        return _outputs_to_torch(outs, self.out_dtype)

    def run_batch(self, paths: Sequence[str | os.PathLike], indices: Sequence[Sequence[int]],
                  flips: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """One batch (at most batch_size samples) -> per encoder [B, T_e, 3, S, S]."""
        paths = [str(p) for p in paths]
        if not 0 < len(paths) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} samples, got {len(paths)}")
        flips = list(flips) if flips is not None else [False] * len(paths)
        return _run_naming_failures(self._run, self.device, paths, list(zip(paths, indices, flips)))

    __call__ = run_batch

    def iterate(self, samples: Iterable[tuple]) -> Iterator[list[torch.Tensor]]:
        """samples: (path, indices) or (path, indices, flip); yields per-batch lists of encoder tensors."""
        batch: list[tuple] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._run_samples(batch)
                batch = []
        if batch:
            yield self._run_samples(batch)

    def _run_samples(self, batch: list[tuple]) -> list[torch.Tensor]:
        return self.run_batch([s[0] for s in batch], [s[1] for s in batch],
                              [bool(s[2]) if len(s) > 2 else False for s in batch])


# ----------------------------------------------------------------------------------------------- images
def build_image_pipeline(encoders: Sequence[EncoderConfig], *, batch_size: int, device: str = "cpu",
                         frames_sampled: int = 32, num_threads: int | None = None, device_id: int = 0,
                         out_dtype: torch.dtype = torch.float32, decode_only: bool = False):
    """The image twin of `build_pipeline`: "encoded" (a JPEG/PNG/... file's bytes) -> `fn.decoders.image` (RGB; EXIF
    orientation applied; "mixed" = nvJPEG on a GPU) -> the image as a one-frame sequence ("FHWC") -> the SAME
    per-encoder graph as videos (`_encoder_outputs`), so each output is [1, 3, S, S]: one frame, which the caller
    expands along time (a static video, MERV_SPEC.md section 1). External sources: "encoded", "flip", and the
    short_side_crop geometry ("rx{k}", ... as in `build_pipeline`, k from `_branch_ids(..., single_frame=True)`).
    decode_only: the decoded image, uint8 [H, W, 3]."""
    pipe, device, dali_out = _new_pipeline(batch_size, device, num_threads, device_id, out_dtype)
    from nvidia.dali import fn, types

    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        if decode_only:
            pipe.set_outputs(image)
            return pipe
        frame = fn.expand_dims(image, axes=[0], new_axis_names="F")
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        pipe.set_outputs(*_encoder_outputs(frame, encoders, frames_sampled, flip, dali_out, single_frame=True))
    return pipe


@functools.lru_cache(maxsize=4)
def _peek_pipeline(batch_size: int):
    """(H, W, C) of encoded images from their headers (`fn.peek_image_shape`, EXIF orientation applied as the
    decoder applies it), on the CPU: the host needs the sizes to compute the short_side_crop geometry."""
    dali, why = _import_dali()
    if dali is None:
        raise RuntimeError(why)
    from nvidia.dali import fn, types

    pipe = dali.Pipeline(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                         exec_async=False, exec_pipelined=False)
    with pipe:
        pipe.set_outputs(fn.peek_image_shape(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)))
    return pipe


def _image_bytes(image) -> np.ndarray:
    """An image given as its encoded bytes (bytes, bytearray, memoryview, uint8 ndarray) or a path -> uint8 [n]."""
    if isinstance(image, (str, os.PathLike)):
        return _read_bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 1:
            raise ValueError(f"encoded image bytes must be uint8 [n], got {image.dtype} {image.shape}")
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return np.frombuffer(image, dtype=np.uint8)
    raise TypeError(f"an image is its encoded bytes or a path, not {type(image).__name__}")


def _image_key(image, i: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"


class DaliImageLoader(_DaliLoader):
    """Batches of encoded images (JPEG, PNG, ...: bytes or paths) -> per encoder [B, 1, 3, S, S] (encoder order).

        loader = DaliImageLoader(cfg.encoders, batch_size=32, device="auto")   # "gpu" (nvJPEG, "mixed") | "cpu"
        inputs = loader.run_batch(images, flips)       # each image ONE frame; expand along time for the model:
        pixels = [x.expand(-1, enc.frames, -1, -1, -1) for x, enc in zip(inputs, cfg.encoders)]

    The resize / crop / flip / normalise graph is the video pipeline's (`_encoder_outputs`), so the tolerances
    against the torch reference are DALI_TOLERANCE (measured on CPU, tests/data/test_dali_images.py, five JPEG/PNG
    images 129x200 to 320x240, up- and downscaled: max |diff| 2e-5 LanguageBind, 5.5e-3 DINOv2, 2.1e-3 ViViT,
    2.5e-3 SigLIP, normalised units). Decoded pixels: IMAGE_DECODE_TOLERANCE against Pillow.
    Images decode to RGB (grayscale replicated, alpha dropped) with their EXIF orientation applied, as
    merv_fast.data.decode.decode_image; the sizes for short_side_crop come from the headers (`fn.peek_image_shape`).
    """

    MEDIA = "image"

    def _pipeline(self):
        if self._pipe is None:  # rebuilt lazily after a critical error, as DaliVideoLoader's
            self._pipe = build_image_pipeline(self.encoders, batch_size=self.batch_size, device=self.device,
                                              frames_sampled=self.frames_sampled, num_threads=self.num_threads,
                                              device_id=self.device_id, out_dtype=self.out_dtype)
        return self._pipe

    def _sizes(self, data: Sequence[np.ndarray]) -> list[tuple[int, int]]:
        pipe = _peek_pipeline(self.batch_size)
        try:
            pipe.feed_input("encoded", list(data))
            (shapes,) = pipe.run()
        except Exception:
            _peek_pipeline.cache_clear()
            raise
        return [(int(shapes.at(i)[0]), int(shapes.at(i)[1])) for i in range(len(data))]

    def _run(self, data: Sequence[np.ndarray], flips: Sequence[bool]) -> list[torch.Tensor]:
        pipe = self._pipeline()
        try:
            pipe.feed_input("encoded", list(data))
            pipe.feed_input("flip", [np.array(int(bool(f)), dtype=np.int32) for f in flips])
            if any(br.resize == "short_side_crop" for br in self._branches):
                _feed_geometry(pipe, self._branches, self._sizes(data))
            outs = pipe.run()
        except Exception:
            self._pipe = None
            raise
        return _outputs_to_torch(outs, self.out_dtype)

    def run_batch(self, images: Sequence, flips: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """One batch (at most batch_size images) -> per encoder [B, 1, 3, S, S]. A batch that fails raises
        DaliDecodeError naming each image that fails alone (its path, or "#i" for bytes at position i)."""
        images = list(images)
        if not 0 < len(images) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} images, got {len(images)}")
        flips = list(flips) if flips is not None else [False] * len(images)
        if len(flips) != len(images):
            raise ValueError(f"{len(images)} images but {len(flips)} flip flags")
        data = [_image_bytes(im) for im in images]
        keys = [_image_key(im, i) for i, im in enumerate(images)]
        return _run_naming_failures(self._run, self.device, keys, list(zip(data, flips)))

    __call__ = run_batch

    def iterate(self, samples: Iterable) -> Iterator[list[torch.Tensor]]:
        """samples: an image (bytes or path) or (image, flip); yields per-batch lists of encoder tensors."""
        batch: list[tuple] = []
        for sample in samples:
            batch.append(sample if isinstance(sample, tuple) else (sample, False))
            if len(batch) == self.batch_size:
                yield self.run_batch([s[0] for s in batch], [bool(s[1]) for s in batch])
                batch = []
        if batch:
            yield self.run_batch([s[0] for s in batch], [bool(s[1]) for s in batch])


@functools.lru_cache(maxsize=4)
def _decode_image_pipeline(device: str, device_id: int):
    return build_image_pipeline([], batch_size=1, device=device, device_id=device_id, decode_only=True)


def decode_image(image, device: str = "auto", device_id: int = 0) -> np.ndarray:
    """One encoded image (bytes or a path) -> uint8 [H, W, 3] RGB in host memory, decoded by DALI (EXIF orientation
    applied). Raises DaliDecodeError with the reason when DALI cannot."""
    dev = resolve_device(device)
    ok, why = dali_available(dev, media="image")
    if not ok:
        raise DaliDecodeError(why)
    pipe = _decode_image_pipeline(dev, device_id)
    try:
        pipe.feed_input("encoded", [_image_bytes(image)])
        (out,) = pipe.run()
    except Exception as err:
        _decode_image_pipeline.cache_clear()
        text = _first_line(err)
        raise DaliDecodeError(f"{_image_key(image, 0)}: DALI ({dev}) could not decode the image: {text}",
                              {_image_key(image, 0): text}) from err
    if dev == "gpu":
        out = out.as_cpu()
    return np.array(out.as_tensor())[0]


# ----------------------------------------------------------------------------------------------- decode only
@functools.lru_cache(maxsize=4)
def _decode_pipeline(device: str, device_id: int):
    return build_pipeline([], batch_size=1, device=device, device_id=device_id, decode_only=True)


def decode_frames(path: str | os.PathLike, indices: Sequence[int], device: str = "auto",
                  device_id: int = 0) -> np.ndarray:
    """The frames at `indices` of one file, uint8 [len(indices), H, W, 3] (host memory), decoded by DALI:
    the `dali` backend of merv_fast.data.decode. Raises DaliDecodeError with the reason when DALI cannot."""
    ok, why = dali_available("gpu" if resolve_device(device) == "gpu" else "cpu")
    if not ok:
        raise DaliDecodeError(why)
    dev = resolve_device(device)
    pipe = _decode_pipeline(dev, device_id)
    try:
        pipe.feed_input("encoded", [_read_bytes(path)])
        pipe.feed_input("frames", [np.asarray(list(indices), dtype=np.int32)])
        (out,) = pipe.run()
    except Exception as err:
        _decode_pipeline.cache_clear()  # invalid after a critical error
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DaliDecodeError(f"{Path(path).name}: DALI ({dev}) could not decode: {text[:300]}",
                              {str(path): text}) from err
    if dev == "gpu":
        out = out.as_cpu()
    return np.array(out.as_tensor())[0]


# ----------------------------------------------------------------------------------------------- decode.py backend
def probe(path: str | os.PathLike):
    """merv_fast.data.decode's backend interface: the container facts come from PyAV (DALI has no probe)."""
    from merv_fast.data import pyav_backend

    return pyav_backend.probe(path)


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """merv_fast.data.decode's backend interface: uint8 [len(indices), H, W, 3], display rotation applied (DALI
    decodes the coded frames; the rotation is read by PyAV and applied here, as FFmpeg's autorotate does)."""
    from merv_fast.data import pyav_backend

    frames = decode_frames(path, indices, device="auto")
    rotation = probe(path).rotation
    return pyav_backend.rotate(frames, rotation) if rotation else frames
