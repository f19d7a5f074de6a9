"""`merv-fast data synth`: a small, real, deterministic dataset on disk.

Real encoded clips (H.264/mp4, VP9/webm, MJPEG/avi, H.264/mkv) with moving content, in the odd-but-valid shapes a
real dataset holds (one frame, fewer than 32 frames, odd sizes, variable frame rate, rotation metadata, grayscale,
one keyframe for the whole clip, an AVI whose header counts empty index entries as frames), JPEG/PNG images (tall,
tiny, grayscale, RGBA) and a LLaVA-format JSON that refers to them by relative path. The same seed writes the same pixels and the same JSON.

The writers (`write_video`, `write_image`) are public: tests build their own odd files with them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

# container suffix -> (PyAV codec name, pixel format it is written in)
CODECS = {
    "h264": ("libx264", "yuv420p"),
    "vp9": ("libvpx-vp9", "yuv420p"),
    "mjpeg": ("mjpeg", "yuvj420p"),
    "ffv1": ("ffv1", "yuv420p"),  # lossless; the one codec here that stores true grayscale ("gray")
}


@dataclass
class VideoSpec:
    """One clip to write. `frame_ms` (per-frame durations in ms) makes the frame rate variable."""

    name: str
    codec: str  # key of CODECS
    width: int
    height: int
    frames: int
    fps: float = 30.0
    gop: int = 12  # frames between keyframes
    rotation: int = 0  # display rotation metadata, degrees counter-clockwise
    gray: bool = False
    frame_ms: list[int] | None = field(default=None, repr=False)


def moving_frames(width: int, height: int, count: int, seed: int = 0, gray: bool = False) -> np.ndarray:
    """uint8 [count, H, W, 3]: a drifting colour gradient with a square that moves across it. Smooth content, not
    noise, so that the encoders compress it like real video and every frame differs from its neighbours."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    side = max(1, min(width, height) // 4)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for t in range(count):
        s = t / max(count, 8)
        for c in range(3):
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * (c + 1) + ys * (2 - c) + s) + phase[c])
            out[t, :, :, c] = (40 + 170 * wave).astype(np.uint8)
        x0 = int((width - side) * s) if width > side else 0
        y0 = int((height - side) * (0.5 + 0.4 * np.sin(2 * np.pi * s))) if height > side else 0
        out[t, y0:y0 + side, x0:x0 + side] = (255, 255 - (t * 7) % 256, (t * 13) % 256)
    if gray:
        out[:] = out.mean(axis=3, keepdims=True).astype(np.uint8)
    return out


def write_video(path: str | Path, spec: VideoSpec, seed: int = 0) -> Path:
    """Encode `spec` with PyAV into `path` (the suffix picks the container). Returns the path."""
    import av

    path = Path(path)
    codec, pix_fmt = CODECS[spec.codec]
    if spec.gray:
        pix_fmt = "gray" if spec.codec == "ffv1" else pix_fmt
    frames = moving_frames(spec.width, spec.height, spec.frames, seed=seed, gray=spec.gray)
    # Integer-ms time base for variable frame rate; otherwise a time base of 1/fps keeps pts = frame number.
    rate = Fraction(spec.fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if spec.frame_ms else 1 / rate
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = spec.gop
        # One encoder thread and fixed settings: the same seed gives the same bitstream.
        stream.codec_context.thread_count = 1
        if spec.codec == "h264":
            stream.options = {"preset": "ultrafast", "crf": "20", "bframes": "2", "keyint_min": str(spec.gop),
                              "sc_threshold": "0"}
        elif spec.codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "row-mt": "0"}
        elif spec.codec == "mjpeg":
            stream.options = {"q:v": "3"}
        if spec.rotation:
            stream.set_display_rotation(spec.rotation)
        pts = 0
        for t in range(spec.frames):
            frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24").reformat(format=pix_fmt)
            frame.pts = pts
            frame.time_base = time_base
            pts += spec.frame_ms[t % len(spec.frame_ms)] if spec.frame_ms else 1
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_image(path: str | Path, width: int, height: int, seed: int = 0, mode: str = "RGB",
                exif_orientation: int | None = None) -> Path:
    """Write a still (the first frame of `moving_frames`) as JPEG or PNG by suffix; `mode` RGB | L | RGBA.
    Pillow writes it when present (it can store an EXIF orientation); PyAV otherwise (no EXIF)."""
    path = Path(path)
    pixels = moving_frames(width, height, 1, seed=seed, gray=(mode == "L"))[0]
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        image = Image.fromarray(pixels)
        if mode == "L":
            image = image.convert("L")
        elif mode == "RGBA":
            image.putalpha(Image.fromarray(np.full((height, width), 200, dtype=np.uint8)))
        kwargs = {"quality": 92} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        if exif_orientation:
            exif = Image.Exif()
            exif[0x0112] = exif_orientation
            kwargs["exif"] = exif.tobytes()
        image.save(path, **kwargs)
        return path
    if exif_orientation:
        raise RuntimeError("writing an EXIF orientation needs Pillow")
    import av

    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    fmt = {"L": "gray", "RGBA": "rgba"}.get(mode, "rgb24")
    if mode == "RGBA":
        pixels = np.concatenate([pixels, np.full((height, width, 1), 200, dtype=np.uint8)], axis=2)
    frame = av.VideoFrame.from_ndarray(pixels if mode != "L" else pixels[..., 0], format=fmt)
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("mjpeg" if jpeg else "png", rate=1)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj444p" if jpeg else fmt
        container.mux(stream.encode(frame.reformat(format=stream.pix_fmt)))
        container.mux(stream.encode(None))
    return path


# The catalogue the default dataset cycles through: every odd-but-valid case the pipeline must load.
def video_catalogue(rng: random.Random) -> list[VideoSpec]:
    jitter = lambda n: n + 2 * rng.randint(0, 8)  # noqa: E731 (even sizes: H.264 4:2:0 needs them)
    return [
        VideoSpec("h264_mp4", "h264", jitter(96), jitter(64), rng.randint(40, 64), fps=30),
        VideoSpec("vp9_webm_odd", "vp9", 321, 239, rng.randint(33, 48), fps=25),
        VideoSpec("mjpeg_avi_short", "mjpeg", jitter(80), jitter(60), rng.randint(10, 20), fps=15),
        VideoSpec("h264_mkv_one_frame", "h264", jitter(64), jitter(48), 1, fps=24),
        VideoSpec("h264_mp4_vfr", "h264", jitter(80), jitter(48), 40, fps=30, frame_ms=[33, 17, 50, 33, 66]),
        VideoSpec("h264_mp4_rot90", "h264", 96, 64, rng.randint(33, 40), fps=30, rotation=90),
        VideoSpec("ffv1_mkv_gray", "ffv1", jitter(64), jitter(48), rng.randint(20, 40), fps=30, gray=True),
        VideoSpec("h264_mp4_one_gop", "h264", jitter(96), jitter(54), 96, fps=60, gop=1000),
        VideoSpec("vp9_webm", "vp9", jitter(96), jitter(64), rng.randint(24, 48), fps=30),
        VideoSpec("mjpeg_mkv", "mjpeg", jitter(64), jitter(64), rng.randint(32, 40), fps=12),
        # A 1/1000 time base in AVI (fixed-rate, one index entry per tick): the muxer writes an empty "drop" entry
        # for every millisecond without a frame, so the header counts ~50x the frames the file holds. Valid: every
        # frame decodes (the release's decoder trains on such files).
        VideoSpec("mjpeg_avi_ms_timebase", "mjpeg", 64, 48, 40, fps=25, frame_ms=[40, 40, 80]),
    ]


SUFFIX = {"h264_mkv_one_frame": ".mkv", "mjpeg_mkv": ".mkv", "mjpeg_avi_short": ".avi", "ffv1_mkv_gray": ".mkv",
          "mjpeg_avi_ms_timebase": ".avi"}


def image_catalogue(rng: random.Random) -> list[tuple[str, str, int, int, str]]:
    """(name, suffix, width, height, mode)"""
    return [
        ("photo", ".jpg", 160 + 2 * rng.randint(0, 20), 120 + 2 * rng.randint(0, 20), "RGB"),
        ("tall", ".jpg", 40, 200, "RGB"),
        ("tiny", ".png", 3, 2, "RGB"),
        ("gray", ".png", 64, 48, "L"),
        ("rgba", ".png", 50, 70, "RGBA"),
        ("gray_jpeg", ".jpg", 72, 40, "L"),
    ]


QUESTIONS = ["What happens in this {m}?", "Describe the {m} in detail.", "What colour is the moving square?",
             "Is the camera moving?", "Summarise the {m} in one sentence."]
ANSWERS = ["A coloured square moves across a shifting gradient.", "The background waves slowly from left to right.",
           "It is mostly white and changes tint over time.", "No, the camera is still; only the square moves.",
           "A square travels over a smooth colour field."]


def conversation(rng: random.Random, modality: str | None,
                 rounds: tuple[int, ...] = (1, 1, 2, 3)) -> list[dict[str, str]]:
    """1-3 rounds (a choice of `rounds`); the media token opens the first human turn (as in LLaVA's data)."""
    turns = []
    for round_ in range(rng.choice(rounds)):
        question = rng.choice(QUESTIONS).format(m=modality or "story")
        if round_ == 0 and modality:
            question = f"<{modality}>\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": rng.choice(ANSWERS)}]
    return turns


def synthesize(out: str | Path, videos: int = 11, images: int = 6, texts: int = 2, seed: int = 0,
               captions: bool = False) -> dict:
    """Write `videos` clips, `images` stills and a `data.json` (all entries, relative paths) into `out`.
    `captions`: every entry is one human/gpt round, as the align stages' caption data (the release's stage-1 mix).
    Returns {"json": path, "media_root": out, "videos": [...], "images": [...], "entries": n}."""
    rounds = (1,) if captions else (1, 1, 2, 3)
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries, video_paths, image_paths = [], [], []
    for i in range(videos):
        catalogue = video_catalogue(rng)
        spec = catalogue[i % len(catalogue)]
        suffix = SUFFIX.get(spec.name, ".webm" if spec.codec == "vp9" else ".mp4")
        rel = f"videos/{i:04d}_{spec.name}{suffix}"
        write_video(out / rel, spec, seed=seed * 1000 + i)
        video_paths.append(rel)
        entries.append({"id": f"video_{i:04d}", "video": rel, "conversations": conversation(rng, "video", rounds)})
    for i in range(images):
        catalogue = image_catalogue(rng)
        name, suffix, width, height, mode = catalogue[i % len(catalogue)]
        rel = f"images/{i:04d}_{name}{suffix}"
        write_image(out / rel, width, height, seed=seed * 1000 + i, mode=mode)
        image_paths.append(rel)
        entries.append({"id": f"image_{i:04d}", "image": rel, "conversations": conversation(rng, "image", rounds)})
    for i in range(texts):
        entries.append({"id": f"text_{i:04d}", "conversations": conversation(rng, None, rounds)})
    json_path = out / "data.json"
    json_path.write_text(json.dumps(entries, indent=1) + "\n")
    return {"json": str(json_path), "media_root": str(out), "videos": video_paths, "images": image_paths,
            "entries": len(entries)}
