"""The release's video loader, mirrored: the benchmark baseline (and a cross-check of semantics), never a training path.

What the MERV release does per video sample (merv/preprocessing/datasets/datasets.py `load_video` and each video
backbone's `video_transform`):
- decode: `decord.VideoReader(path, ctx=cpu(0))`, indices `np.linspace(start*fps, min(N-1, end*fps-1), 32,
  dtype=int)`, `get_batch(indices)` -> uint8 [32, H, W, 3] (torch bridge), permuted to [T, C, H, W];
  each encoder takes `video[::32 // its_frames]`.
- LanguageBind (`get_video_transform`): on the [C, T, H, W] float tensor: x / 255, NormalizeVideo(CLIP mean/std),
  ShortSideScale(224) = `F.interpolate(mode="bilinear", align_corners=False)` to (floor(h/w*224), 224) or
  (224, floor(w/h*224)), CenterCropVideo(224) (offsets int(round((new - 224) / 2))), RandomHorizontalFlipVideo(0.5).
  The release hands the encoder [C, T, 224, 224]; this loader returns [T, C, 224, 224] (our layout; `release_layout`
  keeps theirs) and takes the flip as an argument (the release drew it from the worker's RNG).
- DINOv2 / SigLIP (timm data config, resize-naive): per frame `to_pil_image` -> `Resize((224, 224), BICUBIC)` (PIL,
  antialiased) -> CenterCrop(224) (a no-op at 224) -> ToTensor (/255) -> Normalize (ImageNet / 0.5).
- ViViT (VivitImageProcessor's mean/std, resize-naive): per frame `to_pil_image` -> `Resize((224, 224))` (PIL
  BILINEAR, antialiased) -> CenterCrop -> ToTensor -> Normalize(0.5, 0.5).
torchvision's PIL Resize / ToTensor / Normalize are written out here with PIL and torch (the same operations), so
that torchvision is not needed. decord is the release's decoder; where it does not import, PyAV decodes instead
(`ReleaseLoader.decoder` says which, `release_available()` says why).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from merv_fast.config import EncoderConfig


@functools.lru_cache(maxsize=None)
def _decord():
    try:
        import decord

        decord.bridge.set_bridge("native")
        return decord, None
    except Exception as err:  # noqa: BLE001
        return None, f"decord does not import ({type(err).__name__}: {str(err)[:200]})"


def release_available() -> tuple[bool, str]:
    """(decord usable, reason). Without decord the loader still runs, decoding with PyAV (it says so)."""
    decord, why = _decord()
    if decord is None:
        return False, f"{why}; the release-style loader falls back to PyAV decoding"
    return True, f"decord {decord.__version__} (the release's decoder)"


def release_indices(num_frames: int, fps: float, count: int = 32, start_s: float | None = 0.0,
                    end_s: float | None = None) -> np.ndarray:
    """The release's frame indices: linspace(start*fps, min(N-1, end*fps-1), count, dtype=int)."""
    start_s = 0.0 if start_s is None or math.isnan(start_s) else start_s
    end_s = num_frames / fps if end_s is None or math.isnan(end_s) else end_s
    return np.linspace(start_s * fps, min(num_frames - 1, end_s * fps - 1), count, dtype=int)


def decode_decord(path: str, indices: Sequence[int] | None, count: int = 32) -> np.ndarray:
    decord, why = _decord()
    if decord is None:
        raise RuntimeError(why)
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    if indices is None:
        indices = release_indices(len(vr), vr.get_avg_fps(), count)
    frames = vr.get_batch(list(map(int, indices))).asnumpy()
    del vr
    return frames


def decode_pyav(path: str, indices: Sequence[int] | None, count: int = 32) -> np.ndarray:
    """Fallback: decode sequentially up to the last wanted index, keep the wanted frames (repeats allowed)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if indices is None:
            n = stream.frames or sum(1 for _ in container.decode(stream))
            fps = float(stream.average_rate or 30)
            indices = release_indices(n, fps, count)
            container.seek(0)
        want = sorted(set(int(i) for i in indices))
        got: dict[int, np.ndarray] = {}
        last = None
        for k, frame in enumerate(container.decode(stream)):
            last = frame
            if k in want:
                got[k] = frame.to_ndarray(format="rgb24")
            if k >= want[-1]:
                break
        for i in want:  # indices past the end: the last frame (decord would raise; PyAV metadata may overcount)
            if i not in got and last is not None:
                got[i] = last.to_ndarray(format="rgb24")
    return np.stack([got[int(i)] for i in indices])


# ----------------------------------------------------------------------------------------------- transforms
def languagebind_transform(video_tchw: torch.Tensor, enc: EncoderConfig, flip: bool) -> torch.Tensor:
    """The release's tensor pipeline on [T, C, H, W] uint8 -> [C, T, S, S] (the release's layout)."""
    p, size = enc.preprocess, enc.image_size
    x = video_tchw.permute(1, 0, 2, 3).float() / 255.0  # (C, T, H, W)
    mean = torch.tensor(p.mean, dtype=x.dtype)[:, None, None, None]
    std = torch.tensor(p.std, dtype=x.dtype)[:, None, None, None]
    x = x.sub_(mean).div_(std)  # NormalizeVideo
    c, t, h, w = x.shape  # ShortSideScale
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    x = F.interpolate(x, size=(new_h, new_w), mode=p.interpolation, align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # CenterCropVideo
    x = x[..., top:top + size, left:left + size]
    if flip:  # RandomHorizontalFlipVideo, its coin given
        x = x.flip(-1)
    return x


_PIL_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


def pil_frame_transform(frame_hwc: np.ndarray, enc: EncoderConfig) -> torch.Tensor:
    """to_pil_image -> [LetterboxPad] -> Resize((S, S)) or Resize(short side) -> CenterCrop(S) -> ToTensor ->
    Normalize, one frame: the release's resize-naive, resize-crop and letterbox transforms (its timm / torchvision
    compositions: dinov2_video.py:93-124, vivit.py:53-92, siglip.py:92-134)."""
    from PIL import Image

    p, size = enc.preprocess, enc.image_size
    img = Image.fromarray(frame_hwc)
    resample = getattr(Image.Resampling, _PIL_FILTERS[p.interpolation])
    if p.letterbox:  # LetterboxPad: int((max - side) / 2) on each side, filled with int(mean * 255)
        w, h = img.size
        side = max(w, h)
        pad_w, pad_h = int((side - w) / 2), int((side - h) / 2)
        canvas = Image.new("RGB", (w + 2 * pad_w, h + 2 * pad_h), tuple(int(m * 255) for m in p.mean))
        canvas.paste(img, (pad_w, pad_h))
        img = canvas
    if p.resize == "resize_crop":  # torchvision's Resize(int): the short side to it, the long side truncated
        w, h = img.size
        short = p.short_side or size
        target = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if target != (w, h):
            img = img.resize(target, resample)
    else:
        img = img.resize((size, size), resample)
    w, h = img.size  # CenterCrop: a no-op when the image is already size x size
    if (w, h) != (size, size):
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
    mean = torch.tensor(p.mean)[:, None, None]
    std = torch.tensor(p.std)[:, None, None]
    return x.sub_(mean).div_(std)


def release_transform(video_tchw: torch.Tensor, enc: EncoderConfig, flip: bool = False,
                      release_layout: bool = False) -> torch.Tensor:
    if enc.preprocess.resize == "short_side_crop":
        x = languagebind_transform(video_tchw, enc, flip and enc.preprocess.random_flip)
        return x if release_layout else x.permute(1, 0, 2, 3).contiguous()
    frames = video_tchw.permute(0, 2, 3, 1).numpy()
    return torch.stack([pil_frame_transform(np.ascontiguousarray(f), enc) for f in frames])


class ReleaseLoader:
    """One video -> per-encoder inputs [T_e, 3, S, S] the release's way (decord + PIL per frame)."""

    def __init__(self, encoders: Sequence[EncoderConfig], frames_sampled: int = 32, decoder: str = "auto"):
        self.encoders = list(encoders)
        self.frames_sampled = frames_sampled
        if decoder == "auto":
            decoder = "decord" if _decord()[0] is not None else "pyav"
        if decoder not in ("decord", "pyav"):
            raise ValueError(f"decoder {decoder!r}: decord | pyav")
        if decoder == "decord" and _decord()[0] is None:
            raise RuntimeError(_decord()[1])
        self.decoder = decoder
        self.note = release_available()[1]

    def decode(self, path: str, indices: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 [T, C, H, W], as the release's load_video returns it."""
        fn = decode_decord if self.decoder == "decord" else decode_pyav
        frames = fn(str(path), indices, self.frames_sampled)
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def load(self, path: str, indices: Sequence[int] | None = None, flip: bool = False,
             release_layout: bool = False) -> list[torch.Tensor]:
        video = self.decode(path, indices)
        return [release_transform(video[:: self.frames_sampled // enc.frames], enc, flip, release_layout)
                for enc in self.encoders]

    def load_batch(self, paths: Sequence[str], indices: Sequence[Sequence[int]] | None = None,
                   flips: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """The collated batch: per encoder [B, T_e, 3, S, S]."""
        indices = indices if indices is not None else [None] * len(paths)
        flips = flips if flips is not None else [False] * len(paths)
        per_sample = [self.load(p, i, f) for p, i, f in zip(paths, indices, flips)]
        return [torch.stack(list(parts)) for parts in zip(*per_sample)]
