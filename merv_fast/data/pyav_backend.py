"""CPU decoding with PyAV (FFmpeg): clips by frame index, and still images (Pillow when present, else PyAV).

Torch-free (numpy out) so that the decode worker process starts fast; decode.py wraps the arrays as tensors.

Frame index i is the i-th frame in presentation order, found by a packet scan (demux only, no decoding): sorting the
video packets' pts gives every frame's timestamp and which ones are keyframes. That one definition serves constant
and variable frame rate alike, matches torchcodec's exact mode, and lets decoding seek straight to the keyframe before
each wanted frame and decode forward once, converting only the wanted frames to RGB.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merv_fast.data.media_types import MediaError, VideoInfo

# One decoder thread per clip: the data loader's worker processes are the parallelism, and frame threads would
# only add latency after every seek.
DECODE_THREADS = 1

# Container signatures: a file that starts like a real container but will not open was cut short (or damaged).
SIGNATURES = {b"ftyp": "mp4/mov", b"\x1a\x45\xdf\xa3": "matroska/webm", b"RIFF": "avi"}


def check_file(path: str | Path) -> Path:
    """The checks every reader does before handing the file to a decoder."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "missing file")
    if path.is_dir():
        raise MediaError(path, "a directory, not a file")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise MediaError(path, f"unreadable: {err.strerror or err}") from None
    if size == 0:
        raise MediaError(path, "zero bytes")
    return path


def _ffmpeg_message(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).split(":")[0].strip()[:200] if "Errno" in str(err) else str(text)[:200]


def _container_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp":
        return SIGNATURES[b"ftyp"]
    for magic, kind in SIGNATURES.items():
        if head.startswith(magic):
            return kind
    return None


def open_video(path: str | Path):
    """(container, video stream), or MediaError naming why not."""
    import av

    path = check_file(path)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as err:
        kind = _container_kind(path)
        if kind is not None:
            raise MediaError(path, f"truncated: a {kind} header, but FFmpeg cannot open it "
                                   f"({_ffmpeg_message(err)})") from None
        raise MediaError(path, f"not a video: {_ffmpeg_message(err)}") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise MediaError(path, f"no video stream (has: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = DECODE_THREADS
    return container, stream


@dataclass
class PacketIndex:
    """The packet scan: every frame's pts in presentation order and the frame numbers of the keyframes."""

    pts: list[int]
    keyframes: list[int]  # frame numbers, ascending
    duration_s: float | None
    seekable: bool  # every packet had a pts (else decoding counts frames from the start)
    warnings: tuple[str, ...] = ()  # odd but valid (check_complete)

    def keyframe_before(self, frame: int) -> int:
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, frame) - 1)] if self.keyframes else 0


def scan_packets(path: Path, container, stream) -> PacketIndex:
    import av

    entries = []
    try:
        for packet in container.demux(stream):
            if packet.size:  # size 0: the demuxer's end-of-stream flush packet
                entries.append((packet.pts, packet.is_keyframe, packet.duration))
    except (av.FFmpegError, OSError) as err:
        raise MediaError(path, f"truncated: demuxing stopped after {len(entries)} packets "
                               f"({_ffmpeg_message(err)})") from None
    if not entries:
        raise MediaError(path, "zero frames")
    seekable = all(pts is not None for pts, _, _ in entries)
    if seekable:
        entries.sort(key=lambda e: e[0])
    pts = [e[0] if seekable else i for i, e in enumerate(entries)]
    keyframes = [i for i, e in enumerate(entries) if e[1]] or [0]
    tb = float(stream.time_base) if stream.time_base else None
    duration_s = None
    if seekable and tb:
        last_len = entries[-1][2] or (pts[-1] - pts[-2] if len(pts) > 1 else 0)
        duration_s = (pts[-1] + last_len - pts[0]) * tb
    warnings = _check_complete(path, container, stream, len(entries), duration_s)
    return PacketIndex(pts, keyframes, duration_s, seekable, warnings)


def _check_complete(path: Path, container, stream, packets: int, scanned_s: float | None) -> tuple[str, ...]:
    header_s = None
    if stream.duration and stream.time_base:
        header_s = float(stream.duration * stream.time_base)
    elif container.duration:
        header_s = container.duration / 1e6
    return check_complete(path, stream.frames or None, packets, header_s, scanned_s)


def check_complete(path, header_frames: int | None, frames: int, header_s: float | None,
                   scanned_s: float | None) -> tuple[str, ...]:
    """What the header promises against what the packet scan found, as warnings, never as errors: a sample is bad
    only when a frame its sampling needs does not decode (the sampling runs over the frames the scan found, as the
    release's decoder counts them). A header can promise more for harmless reasons (an AVI muxed with a 1/1000 time
    base counts an empty index entry for every millisecond without a frame) or because the file was cut short
    (mkv/webm/avi whose header comes first: the release trains on what is left, and so do we; an mp4 cut short
    does not open at all). 10% slack on durations: headers round, audio may run longer."""
    warnings = []
    if header_frames and frames < header_frames:
        warnings.append(f"the header counts {header_frames} frames, the file holds {frames}")
    if header_s and scanned_s is not None and scanned_s < 0.9 * header_s - 0.1:
        warnings.append(f"the header says {header_s:.2f} s, the frames end at {scanned_s:.2f} s (cut short?)")
    return tuple(warnings)


def container_duration_s(path: Path) -> float | None:
    """The container header's duration (an open, no demuxing)."""
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        return container.duration / 1e6 if container.duration else None


def _rotation(degrees) -> int:
    return int(round((degrees or 0) / 90.0)) * 90 % 360


def rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise) to [..., H, W, C] frames, as FFmpeg's autorotate."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=k, axes=(-3, -2))) if k else rgb


# The dataset probes a clip, samples indices, then decodes it: the second open reuses the first one's scan.
_SCAN_CACHE: OrderedDict = OrderedDict()
_SCAN_CACHE_SIZE = 16


def _cached_scan(path: Path, container, stream) -> PacketIndex:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _SCAN_CACHE:
        _SCAN_CACHE.move_to_end(key)
        return _SCAN_CACHE[key]
    index = scan_packets(path, container, stream)
    _SCAN_CACHE[key] = index
    while len(_SCAN_CACHE) > _SCAN_CACHE_SIZE:
        _SCAN_CACHE.popitem(last=False)
    return index


def _first_frame(path: Path, container, stream, index: PacketIndex):
    import av

    try:
        _rewind(container, stream, index)
        for frame in container.decode(stream):
            return frame
    except (av.FFmpegError, OSError) as err:
        raise MediaError(path, f"undecodable: {_ffmpeg_message(err)}") from None
    raise MediaError(path, "zero frames (no packet decodes)")


def probe(path: str | Path) -> VideoInfo:
    path = check_file(path)
    container, stream = open_video(path)
    with container:
        index = _cached_scan(path, container, stream)
        frame = _first_frame(path, container, stream, index)  # proves it decodes, and carries the display rotation
        rotation = _rotation(frame.rotation)
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        n = len(index.pts)
        fps = float(stream.average_rate) if stream.average_rate else None
        if not fps and index.duration_s:
            fps = n / index.duration_s
        return VideoInfo(num_frames=n, fps=fps, width=width, height=height, rotation=rotation,
                         codec=stream.codec_context.name, duration_s=index.duration_s, warnings=index.warnings)


def read_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] RGB (display orientation), in the order given; repeats decoded once."""
    import av

    path = check_file(path)
    if len(indices) == 0:
        raise ValueError("no frame indices asked for")
    container, stream = open_video(path)
    with container:
        index = _cached_scan(path, container, stream)
        n = len(index.pts)
        bad = [i for i in indices if not 0 <= int(i) < n]
        if bad:
            raise IndexError(f"{path}: frame indices {bad[:4]} outside [0, {n}) ")
        wanted = sorted({int(i) for i in indices})
        try:
            got = _decode_wanted(container, stream, index, wanted) if index.seekable else None
            if got is None:  # no pts to seek by, or a seek that landed past its target: decode from the start
                got = _decode_sequential(container, stream, index, wanted)
        except (av.FFmpegError, OSError) as err:
            raise MediaError(path, f"corrupt video: decoding failed ({_ffmpeg_message(err)})") from None
        missing = [i for i in wanted if i not in got]
        if missing:
            raise MediaError(path, f"truncated: frame {missing[0]} of {n} does not decode "
                                   f"({len(got)} of {len(wanted)} wanted frames did)")
        shapes = {a.shape for a in got.values()}
        if len(shapes) > 1:  # a mid-stream resolution change: the batch needs one size
            raise MediaError(path, f"frame size changes within the clip {sorted(shapes)}")
        return np.stack([got[int(i)] for i in indices])


# libswscale's YUV->RGB conversion on one thread, for the same reason as DECODE_THREADS: its default (one thread per
# core) is slower per frame at these sizes (0.28 vs 0.37-0.42 ms for a 640x480 frame on 2 cores) and takes the cores
# the other loader workers need. Same pixels either way. PyAV before 13 has no `threads` argument.
_RGB_OPTIONS: dict = {"threads": 1}


def _to_rgb(frame) -> np.ndarray:
    global _RGB_OPTIONS
    try:
        rgb = frame.to_ndarray(format="rgb24", **_RGB_OPTIONS)
    except TypeError:
        if not _RGB_OPTIONS:
            raise
        _RGB_OPTIONS = {}
        rgb = frame.to_ndarray(format="rgb24")
    return rotate(rgb, _rotation(frame.rotation))


def _decode_wanted(container, stream, index: PacketIndex, wanted: list[int]) -> dict[int, np.ndarray] | None:
    """Seek to the keyframe before the next wanted frame whenever that skips frames, decode forward, convert only the
    wanted frames. None if a seek landed after its target (a bad index in the file): the caller decodes from 0."""
    frame_of_pts = {p: i for i, p in enumerate(index.pts)}
    got: dict[int, np.ndarray] = {}
    position = None  # frame number of the last frame decoded
    w = 0
    while w < len(wanted):
        target = wanted[w]
        keyframe = index.keyframe_before(target)
        if position is None or keyframe > position + 1 or target <= position:
            container.seek(index.pts[keyframe], stream=stream, backward=True)
            position = None
        for frame in container.decode(stream):
            number = frame_of_pts.get(frame.pts)
            if number is None:
                continue  # a frame the scan did not count (e.g. a leading frame before the first pts)
            if position is None and number > target:
                return None
            position = number
            if number == target:
                got[number] = _to_rgb(frame)
                w += 1
                if w == len(wanted):
                    return got
                target = wanted[w]
                if index.keyframe_before(target) > position + 1:
                    break  # the next wanted frame is cheaper to reach by seeking
            elif number > target:
                return None  # the wanted frame never came out of the decoder
        else:
            return got  # end of stream: the caller reports what is missing
    return got


def _rewind(container, stream, index: PacketIndex) -> None:
    """Back to the first packet after the scan read to the end."""
    if index.seekable:
        container.seek(index.pts[0], stream=stream, backward=True)
    else:  # no timestamps to seek by: byte 0 of the file
        container.seek(0, stream=stream, any_frame=True)


def _decode_sequential(container, stream, index: PacketIndex, wanted: list[int]) -> dict[int, np.ndarray]:
    _rewind(container, stream, index)
    got: dict[int, np.ndarray] = {}
    want = set(wanted)
    for number, frame in enumerate(container.decode(stream)):
        if number in want:
            got[number] = _to_rgb(frame)
            if len(got) == len(want):
                break
    return got


# ------------------------------------------------------------------------------------------------------ images
def read_image(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB, EXIF orientation applied. Pillow when installed (as the release: libjpeg-turbo, faster
    than FFmpeg's JPEG decoder here, and bit-identical to the release's `Image.open(...).convert("RGB")`)."""
    path = check_file(path)
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return _read_image_pyav(path)
    return _read_image_pil(path)


def _read_image_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = check_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            # convert("RGB") as the release: grayscale is replicated, an alpha channel dropped (not composited).
            return np.array(image.convert("RGB"))  # a writable copy (asarray is read-only, torch warns)
    except UnidentifiedImageError:
        raise MediaError(path, "corrupt image: not a format Pillow recognises") from None
    except Image.DecompressionBombError as err:
        raise MediaError(path, f"corrupt image: {err}"[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL raises all of these on damaged files
        raise MediaError(path, f"corrupt image: {err}"[:200]) from None


def _read_image_pyav(path: Path) -> np.ndarray:
    import av

    path = check_file(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(path, f"corrupt image: {_ffmpeg_message(err)}") from None
    with container:
        if not container.streams.video:
            raise MediaError(path, "corrupt image: no picture in the file")
        # FFmpeg fills a cut-short JPEG with gray and says nothing unless told to fail on errors.
        container.streams.video[0].codec_context.options = {"err_detect": "explode"}
        try:
            for frame in container.decode(video=0):
                # FFmpeg >= 8 turns an EXIF orientation into a display rotation (mirrored orientations: rotation only)
                return _to_rgb(frame)
        except (av.FFmpegError, OSError) as err:
            raise MediaError(path, f"corrupt image: {_ffmpeg_message(err)}") from None
    raise MediaError(path, "corrupt image: nothing decodes")



# ------------------------------------------------------------------------------------------------------ GIFs
def read_gif(path: str | Path, count: int) -> tuple[np.ndarray, list[int]]:
    """(uint8 [count, H, W, 3], the frame indices): `count` frames of an animated GIF taken by linspace over all of
    its frames, each composited and converted by Pillow as the release's TGIF reading does (`ImageSequence` +
    `convert("RGB")`; merv/preprocessing/datasets/datasets.py:116-122). Frames are walked in order and only the
    sampled ones are kept."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    from merv_fast.data.frames import sample_frame_indices

    path = check_file(path)
    try:
        with Image.open(path) as image:
            total = getattr(image, "n_frames", 1)
            wanted = sample_frame_indices(total, None, count)
            kept: dict[int, np.ndarray] = {}
            for number, frame in enumerate(ImageSequence.Iterator(image)):
                if number in wanted:
                    kept[number] = np.array(frame.convert("RGB"))
                if number >= wanted[-1]:
                    break
    except UnidentifiedImageError:
        raise MediaError(path, "corrupt GIF: not a format Pillow recognises") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise MediaError(path, f"corrupt GIF: {err}"[:200]) from None
    missing = [i for i in wanted if i not in kept]
    if missing:
        raise MediaError(path, f"truncated GIF: frame {missing[0]} of {total} does not decode")
    return np.stack([kept[i] for i in wanted]), wanted
