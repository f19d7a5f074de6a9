"""Decoding: odd-but-valid files load exactly, broken ones raise MediaError with the reason, the timeout holds."""

import shutil
import subprocess
import time

import av
import numpy as np
import pytest
import torch

from merv_fast.data import decode, pyav_backend
from merv_fast.data.decode import (MediaError, available_decoders, choose_decoder, decode_image, decode_video,
                                   decode_video_sampled, load_media_with_timeout, probe_video, resolve_media_path)
from merv_fast.data.frames import sample_frame_indices
from merv_fast.data.synth import VideoSpec, synthesize, write_image, write_video

TORCHCODEC = available_decoders()["torchcodec"][0]
BACKENDS = ["pyav"] + (["torchcodec"] if TORCHCODEC else [])
needs_torchcodec = pytest.mark.skipif(not TORCHCODEC, reason=f"torchcodec: {available_decoders()['torchcodec'][1]}")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    result = synthesize(root, videos=11, images=6, seed=0)  # one clip of each kind in the catalogue
    return root, result


def reference_frames(path) -> np.ndarray:
    """PyAV's plain sequential decode of every frame, rotated as FFmpeg's autorotate does."""
    frames = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            k = int(round(f.rotation / 90)) % 4
            frames.append(np.rot90(f.to_ndarray(format="rgb24"), k=k))
    return np.stack(frames)


# ------------------------------------------------------------------------------------------------ valid files
def test_every_synth_clip_matches_a_full_sequential_decode(synth):
    root, result = synth
    for rel in result["videos"]:
        ref = reference_frames(root / rel)
        info = probe_video(root / rel, "pyav")
        assert info.num_frames == len(ref) and (info.height, info.width) == ref.shape[1:3], rel
        idx = sample_frame_indices(info.num_frames, info.fps, 32)
        got = decode_video(root / rel, idx, "pyav")
        assert got.dtype == torch.uint8 and got.shape == (32, *ref.shape[1:])
        assert np.array_equal(got.numpy(), ref[idx]), rel
        # any order, repeats, the last frame first: returned as asked
        odd = [len(ref) - 1, 0, len(ref) // 2, len(ref) // 2, 0]
        assert np.array_equal(decode_video(root / rel, odd, "pyav").numpy(), ref[odd]), rel


def test_odd_cases_report_what_they_are(synth):
    root, result = synth
    info = {rel.split("_", 1)[1].rsplit(".", 1)[0]: probe_video(root / rel, "pyav") for rel in result["videos"]}
    assert info["h264_mkv_one_frame"].num_frames == 1
    assert info["mjpeg_avi_short"].num_frames < 32
    assert (info["vp9_webm_odd"].width, info["vp9_webm_odd"].height) == (321, 239)
    rot = info["h264_mp4_rot90"]
    assert rot.rotation == 90 and (rot.width, rot.height) == (64, 96)  # stored 96x64, displayed upright
    vfr = info["h264_mp4_vfr"]
    assert vfr.num_frames == 40 and 25 < vfr.fps < 26.5  # frames by index; fps the average
    gray = decode_video(root / [r for r in result["videos"] if "gray" in r][0], [0, 5], "pyav")
    assert torch.equal(gray[..., 0], gray[..., 1]) and torch.equal(gray[..., 1], gray[..., 2])
    assert all(not i.warnings for name, i in info.items() if name != "mjpeg_avi_ms_timebase")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_header_that_counts_empty_index_entries_is_kept_with_a_warning(synth, backend):
    """An MJPEG AVI muxed with a 1/1000 time base: the header counts every empty drop entry as a frame (about 40x
    the real frames), yet every frame decodes. Kept, with a warning; the sampling runs over the real frames."""
    root, result = synth
    path = root / next(r for r in result["videos"] if "ms_timebase" in r)
    with av.open(str(path)) as c:
        header_frames = c.streams.video[0].frames
    info = probe_video(path, backend)
    ref = reference_frames(path)
    assert info.num_frames == len(ref) == 40 and header_frames > 10 * len(ref)
    assert info.warnings == (f"the header counts {header_frames} frames, the file holds 40",)
    frames, idx, info = decode_video_sampled(path, count=32, decoder=backend, timeout_s=60)
    assert idx[-1] == len(ref) - 1 and np.array_equal(frames.numpy(), ref[idx])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vp9_webm_odd", "mjpeg_avi_short", "mjpeg_mkv", "mjpeg_avi_ms_timebase"])
def test_a_file_cut_short_is_kept_when_the_frames_sampled_from_what_is_left_decode(synth, tmp_path, kind, backend):
    """The release's decoder counts the frames a cut mkv/webm/avi still holds and trains on them: a sample is bad
    only when a frame its sampling needs does not decode. Kept, with a warning naming what the header promised."""
    root, result = synth
    whole = root / next(r for r in result["videos"] if r.split("_", 1)[1].rsplit(".", 1)[0] == kind)
    with av.open(str(whole)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    keep = len(packets) * 6 // 10
    cut = tmp_path / f"cut{whole.suffix}"
    cut.write_bytes(whole.read_bytes()[: packets[keep - 1][0] + packets[keep - 1][1]])  # after a whole packet
    info = probe_video(cut, backend)
    assert keep - 1 <= info.num_frames <= keep  # matroska's last block may need the bytes after its packet
    assert any(w.startswith("the header") for w in info.warnings), info.warnings
    frames, idx, _ = decode_video_sampled(cut, count=32, decoder=backend, timeout_s=60)
    want = reference_frames(cut)[idx]
    if backend == "torchcodec" and (info.width % 2 or info.height % 2):  # odd 4:2:0: see test_torchcodec_agrees...
        assert np.abs(frames.numpy().astype(int) - want).mean() < 1.0
    else:
        assert np.array_equal(frames.numpy(), want)


def test_seeking_decodes_each_frame_once(tmp_path, monkeypatch):
    path = write_video(tmp_path / "gop.mp4", VideoSpec("gop", "h264", 64, 48, 90, gop=10))
    converted = []
    real = pyav_backend._to_rgb
    monkeypatch.setattr(pyav_backend, "_to_rgb", lambda f: converted.append(f.pts) or real(f))
    idx = [85, 3, 3, 40, 41, 85]
    got = pyav_backend.read_frames(path, idx)
    assert np.array_equal(got, reference_frames(path)[idx])
    assert len(converted) == len(set(idx))  # repeats converted once


def test_long_keyframe_interval_and_large_frames(tmp_path):
    one_gop = write_video(tmp_path / "onegop.mp4", VideoSpec("g", "h264", 80, 60, 120, gop=1000))
    idx = [119, 0, 60]
    assert np.array_equal(decode_video(one_gop, idx, "pyav").numpy(), reference_frames(one_gop)[idx])
    big = write_video(tmp_path / "big.mp4", VideoSpec("big", "h264", 1920, 1080, 2))
    got = decode_video(big, [1, 0, 1], "pyav")
    assert got.shape == (3, 1080, 1920, 3)
    assert np.array_equal(got.numpy(), reference_frames(big)[[1, 0, 1]])


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg CLI to compare rotation against")
def test_rotation_matches_ffmpeg_autorotate(tmp_path):
    for degrees in (90, 180, 270):
        path = write_video(tmp_path / f"r{degrees}.mkv", VideoSpec("r", "ffv1", 48, 32, 2, rotation=degrees))
        got = decode_video(path, [1], "pyav")[0].numpy()
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "2", "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        want = np.frombuffer(raw, np.uint8).reshape(2, *got.shape)[1]
        assert np.array_equal(got, want), degrees


@needs_torchcodec
def test_torchcodec_agrees_with_pyav(synth):
    root, result = synth
    for rel in result["videos"]:
        a, b = probe_video(root / rel, "pyav"), probe_video(root / rel, "torchcodec")
        assert (a.num_frames, a.width, a.height, a.rotation) == (b.num_frames, b.width, b.height, b.rotation), rel
        idx = sample_frame_indices(a.num_frames, a.fps, 32)[::-1]
        x, y = decode_video(root / rel, idx, "pyav").int(), decode_video(root / rel, idx, "torchcodec").int()
        if a.width % 2 or a.height % 2:  # odd-sized 4:2:0: the two round the last chroma column differently
            assert (x - y).abs().float().mean() < 1.0, rel
        else:
            assert torch.equal(x, y), rel


def test_sampled_decode_in_one_call(synth):
    root, result = synth
    rel = result["videos"][0]
    frames, idx, info = decode_video_sampled(root / rel, count=32, timeout_s=30)
    assert idx == sample_frame_indices(info.num_frames, info.fps, 32)
    assert torch.equal(frames, decode_video(root / rel, idx, "pyav"))


# ------------------------------------------------------------------------------------------------------ images
def test_images(synth):
    root, result = synth
    shapes = {rel: tuple(decode_image(root / rel).shape) for rel in result["images"]}
    assert all(s[2] == 3 for s in shapes.values())
    tall = [s for r, s in shapes.items() if "tall" in r][0]
    assert tall == (200, 40, 3)
    assert [s for r, s in shapes.items() if "tiny" in r][0] == (2, 3, 3)
    gray = decode_image(root / [r for r in result["images"] if "gray.png" in r][0])
    assert torch.equal(gray[..., 0], gray[..., 2])


def test_image_exif_orientation(tmp_path):
    pytest.importorskip("PIL", reason="writing an EXIF orientation needs Pillow")
    plain = decode_image(write_image(tmp_path / "plain.jpg", 64, 32, seed=1))
    turned = decode_image(write_image(tmp_path / "exif6.jpg", 64, 32, seed=1, exif_orientation=6))
    assert turned.shape == (64, 32, 3)  # orientation 6: shown rotated 90 degrees clockwise
    assert (turned.int() - torch.rot90(plain, k=-1, dims=(0, 1)).int()).abs().float().mean() < 2


def test_image_pyav_fallback_agrees_with_pillow(synth):
    pytest.importorskip("PIL")
    root, result = synth
    for rel in result["images"]:
        a, b = pyav_backend._read_image_pil(root / rel), pyav_backend._read_image_pyav(root / rel)
        assert a.shape == b.shape, rel
        if rel.endswith(".png"):
            assert np.array_equal(a, b), rel  # lossless: identical; JPEG: the two upsample chroma differently


# ---------------------------------------------------------------------------------------------- broken inputs
def _audio_packets(container):
    s = container.add_stream("aac", rate=16000)
    s.layout = "mono"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for i in range(8):
        frame.pts = i * 1024
        container.mux(s.encode(frame))
    container.mux(s.encode(None))


def _audio_only(path):
    with av.open(str(path), "w") as c:
        _audio_packets(c)
    return path


def _zero_frames(path):
    """A video stream declared in the header with no packets (an audio stream keeps the file valid: muxers drop a
    file's only, empty stream)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        _audio_packets(c)
    return path


def _broken_files(tmp_path, synth):
    root, result = synth
    good = root / result["videos"][0]

    def half(src, dst):
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        return dst

    (tmp_path / "a_dir").mkdir()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    return {
        "missing": (tmp_path / "nope.mp4", "missing file"),
        "directory": (tmp_path / "a_dir", "a directory"),
        "zero bytes": (tmp_path / "empty.mp4", "zero bytes"),
        "text": (tmp_path / "notes.mp4", "not a video"),
        "random bytes": (tmp_path / "noise.mp4", "not a video"),
        "truncated mp4": (half(good, tmp_path / "half.mp4"), "truncated"),
        "audio only": (_audio_only(tmp_path / "audio.m4a"), "no video stream"),
        "zero frames": (_zero_frames(tmp_path / "zero.mkv"), "zero frames"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_videos_raise_media_error_with_the_reason(tmp_path, synth, backend):
    for case, (path, reason) in _broken_files(tmp_path, synth).items():
        for call in (lambda: probe_video(path, backend), lambda: decode_video(path, [0], backend)):
            with pytest.raises(MediaError) as err:
                call()
            assert err.value.reason.startswith(reason), (case, err.value.reason)
            assert err.value.path == str(path) and str(path) in str(err.value)


def test_broken_files_in_the_worker_raise_the_same(tmp_path, synth):
    for case, (path, reason) in _broken_files(tmp_path, synth).items():
        with pytest.raises(MediaError) as err:
            decode_video(path, [0], "pyav", timeout_s=20)
        assert err.value.reason.startswith(reason), (case, err.value.reason)


def test_corrupt_images(tmp_path, synth):
    root, result = synth
    jpg = root / [r for r in result["images"] if r.endswith(".jpg")][0]
    png = root / [r for r in result["images"] if r.endswith(".png")][0]
    (tmp_path / "half.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (tmp_path / "half.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {"half.jpg": "corrupt image", "half.png": "corrupt image", "text.jpg": "corrupt image",
             "empty.png": "zero bytes", "missing.png": "missing file"}
    readers = [pyav_backend.read_image, pyav_backend._read_image_pyav]
    for name, reason in cases.items():
        for read in readers:
            with pytest.raises(MediaError) as err:
                read(tmp_path / name)
            assert err.value.reason.startswith(reason), (name, read.__name__, err.value.reason)


def test_frame_index_outside_the_clip(synth):
    root, result = synth
    with pytest.raises(IndexError):
        decode_video(root / result["videos"][0], [10_000], "pyav")


def test_media_root_escapes(tmp_path):
    root = tmp_path / "media"
    (root / "videos").mkdir(parents=True)
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (root / "videos" / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    assert resolve_media_path(root, "videos/a.mp4") == (root / "videos/a.mp4").resolve()
    for bad in ("../secret.mp4", "videos/../../secret.mp4", str(tmp_path / "secret.mp4"), "videos/link.mp4"):
        with pytest.raises(MediaError) as err:
            resolve_media_path(root, bad)
        assert err.value.reason.startswith("outside the media root")


# ---------------------------------------------------------------------------------------- timeout and choice
def test_timeout_kills_a_hanging_call_and_the_next_call_works(synth):
    root, result = synth
    start = time.monotonic()
    with pytest.raises(MediaError) as err:
        load_media_with_timeout(time.sleep, 60, timeout_s=1.0)  # stands in for a decoder stuck in C code
    assert time.monotonic() - start < 1.0 + 1.5
    assert err.value.reason == "timed out after 1s"
    rel = result["videos"][0]
    assert torch.equal(decode_video(root / rel, [0, 1], "pyav", timeout_s=20), decode_video(root / rel, [0, 1], "pyav"))


def test_a_crashing_decoder_is_a_media_error():
    import os

    with pytest.raises(MediaError) as err:
        load_media_with_timeout(os._exit, 3, timeout_s=20)
    assert err.value.reason.startswith("decoder crashed")


def test_decoder_choice():
    status = available_decoders()
    assert set(status) == {"dali", "torchcodec", "pyav"} and status["pyav"][0]
    name, why = choose_decoder("auto")
    assert name == "pyav" and why  # measured faster per core than torchcodec here (see choose_decoder)
    assert choose_decoder("pyav")[0] == "pyav"
    if not status["dali"][0]:
        with pytest.raises(ValueError, match="dali"):
            choose_decoder("dali")
    with pytest.raises(ValueError, match="unknown decoder"):
        choose_decoder("decord")


def test_env_report_names_the_decoder():
    from merv_fast.env import decoder_report

    assert decoder_report()["auto"] == decode.choose_decoder()[0]
