"""DALI pipeline (merv_fast.data.dali): CPU decoding (VP9, MJPEG) against PyAV, preprocessing against the torch
reference, and on a GPU the mixed (NVDEC) H.264 path. Skipped, with the reason, where DALI does not import."""

import numpy as np
import pytest
import torch

from merv_fast.config import dinov2_encoder, languagebind_encoder, siglip_encoder, vivit_encoder
from merv_fast.data import dali as D
from merv_fast.data.preprocess import preprocess_for_encoder
from merv_fast.data.synth import VideoSpec, write_video

OK, WHY = D.dali_available("cpu")
pytestmark = pytest.mark.skipif(not OK, reason=WHY)
ENCODERS = [languagebind_encoder(), dinov2_encoder(), vivit_encoder(), siglip_encoder()]
FRAMES = 40


def pyav_frames(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_clips")
    specs = {"vp9": (VideoSpec("a", "vp9", 320, 240, FRAMES, fps=25), ".webm"),
             "mjpeg_odd": (VideoSpec("b", "mjpeg", 322, 238, FRAMES, fps=30), ".avi"),
             "mjpeg_tall": (VideoSpec("c", "mjpeg", 240, 320, FRAMES, fps=24), ".mkv"),
             "vp9_small": (VideoSpec("d", "vp9", 160, 120, FRAMES, fps=25), ".webm")}
    return {k: write_video(root / f"{k}{suffix}", spec, seed=i) for i, (k, (spec, suffix)) in enumerate(specs.items())}


INDICES = np.linspace(0, FRAMES - 1, 32).astype(int)


def test_available_reports_a_reason():
    ok, why = D.dali_available("cpu")
    assert ok and "DALI" in why
    ok_gpu, why_gpu = D.dali_available("gpu")
    assert ok_gpu == torch.cuda.is_available() and why_gpu


@pytest.mark.parametrize("name", ["vp9", "mjpeg_odd", "mjpeg_tall"])
def test_cpu_decode_matches_pyav_at_the_requested_indices(clips, name):
    """Frame selection is exact; pixels differ by DALI's YUV->RGB conversion (DECODE_TOLERANCE)."""
    indices = [0, 3, 3, 17, FRAMES - 1, 8]  # unsorted, repeated: as the frames argument allows
    got = D.decode_frames(clips[name], indices, device="cpu")
    ref = pyav_frames(clips[name])
    assert got.shape == (len(indices), *ref[0].shape) and got.dtype == np.uint8
    for k, i in enumerate(indices):
        err = np.abs(got[k].astype(np.int16) - ref[i]).mean()
        assert err < D.DECODE_TOLERANCE["mean_abs"], (name, i, err)
        # the right frame, not a neighbour: the neighbours are clearly further away
        others = [np.abs(got[k].astype(np.int16) - ref[j]).mean() for j in (i - 1, i + 1) if 0 <= j < FRAMES]
        assert all(err < o for o in others), (name, i, err, others)


@pytest.mark.parametrize("name", ["vp9", "mjpeg_odd", "mjpeg_tall", "vp9_small"])
def test_pipeline_matches_torch_reference(clips, name):
    """Same decoded frames through DALI's resize/crop/flip/normalise and through merv_fast.data.preprocess."""
    path = clips[name]
    loader = D.DaliVideoLoader(ENCODERS, batch_size=2, device="cpu", num_threads=2)
    outs = loader.run_batch([path, path], [INDICES, INDICES], [False, True])
    frames = torch.from_numpy(np.stack([D.decode_frames(path, INDICES, device="cpu")] * 2))
    flip = torch.tensor([False, True])
    for enc, out in zip(ENCODERS, outs):
        ref = preprocess_for_encoder(frames, enc, 32, flip)
        assert out.shape == ref.shape == (2, enc.frames, 3, 224, 224) and out.dtype == torch.float32
        err = (out - ref).abs()
        tol = D.DALI_TOLERANCE[(enc.preprocess.interpolation, enc.preprocess.antialias)]
        assert err.max() <= tol["max"] and err.mean() <= tol["mean"], (name, enc.name, err.max(), err.mean())


def test_flip_only_where_the_spec_says_and_dtypes(clips):
    path = clips["vp9_small"]
    encs = [languagebind_encoder(), siglip_encoder()]
    a = D.DaliVideoLoader(encs, batch_size=2, device="cpu", out_dtype=torch.float16).run_batch(
        [path, path], [INDICES, INDICES], [False, True])
    assert all(t.dtype == torch.float16 for t in a)
    assert torch.equal(a[0][1], a[0][0].flip(-1))  # LanguageBind mirrored for the flagged sample
    assert torch.equal(a[1][1], a[1][0])  # SigLIP ignores the flag
    b = D.DaliVideoLoader(encs, batch_size=2, device="cpu", out_dtype=torch.bfloat16).run_batch([path], [INDICES])
    assert b[0].dtype == torch.bfloat16 and b[0].shape == (1, 16, 3, 224, 224)


def test_iterate_batches_and_names_a_broken_file(clips, tmp_path):
    loader = D.DaliVideoLoader(ENCODERS[:1], batch_size=2, device="cpu")
    samples = [(clips["vp9"], INDICES), (clips["mjpeg_odd"], INDICES, True), (clips["vp9_small"], INDICES)]
    shapes = [tuple(b[0].shape) for b in loader.iterate(samples)]
    assert shapes == [(2, 16, 3, 224, 224), (1, 16, 3, 224, 224)]
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"not a video at all" * 100)
    bad_sizes = D.DaliVideoLoader(ENCODERS[:1], batch_size=2, device="cpu", sizes={str(bad): (240, 320)})
    with pytest.raises(D.DaliDecodeError) as info:
        bad_sizes.run_batch([clips["vp9"], bad], [INDICES, INDICES])
    assert str(bad) in info.value.bad and str(clips["vp9"]) not in info.value.bad
    # the loader recovers: the next batch decodes
    assert bad_sizes.run_batch([clips["vp9"]], [INDICES])[0].shape == (1, 16, 3, 224, 224)


@pytest.mark.gpu
def test_mixed_h264_decode_and_preprocess(tmp_path):
    ok, why = D.dali_available("gpu")
    if not ok:
        pytest.skip(why)
    path = write_video(tmp_path / "h264.mp4", VideoSpec("h", "h264", 320, 240, FRAMES, fps=30, gop=12))
    got = D.decode_frames(path, [0, 5, 5, 20, FRAMES - 1], device="gpu")
    ref = pyav_frames(path)
    for k, i in enumerate([0, 5, 5, 20, FRAMES - 1]):
        err = np.abs(got[k].astype(np.int16) - ref[i]).mean()
        others = [np.abs(got[k].astype(np.int16) - ref[j]).mean() for j in (i - 1, i + 1) if 0 <= j < FRAMES]
        assert err < D.DECODE_TOLERANCE["mean_abs"] and all(err < o for o in others), (i, err, others)
    outs = D.DaliVideoLoader(ENCODERS, batch_size=2, device="gpu").run_batch([path, path], [INDICES, INDICES],
                                                                             [True, False])
    frames = torch.from_numpy(np.stack([D.decode_frames(path, INDICES, device="gpu")] * 2))
    for enc, out in zip(ENCODERS, outs):
        assert out.is_cuda
        ref = preprocess_for_encoder(frames, enc, 32, torch.tensor([True, False]))
        err = (out.cpu() - ref).abs()
        tol = D.DALI_TOLERANCE[(enc.preprocess.interpolation, enc.preprocess.antialias)]
        assert err.max() <= tol["max"] and err.mean() <= tol["mean"], (enc.name, err.max(), err.mean())
