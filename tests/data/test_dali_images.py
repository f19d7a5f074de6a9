"""DALI image path (merv_fast.data.dali.DaliImageLoader): JPEG/PNG decoded on the CPU against Pillow, the shared
resize/crop/flip/normalise graph against the torch reference (`preprocess_reference`), one frame per image, broken
images named; on a GPU the mixed (nvJPEG) path. Skipped, with the reason, where DALI does not import."""

import numpy as np
import pytest
import torch

from merv_fast.config import dinov2_encoder, languagebind_encoder, siglip_encoder, vivit_encoder
from merv_fast.data import dali as D
from merv_fast.data.preprocess import encoder_input_spec
from merv_fast.data.pyav_backend import read_image
from merv_fast.data.synth import write_image
from merv_fast.kernels.preprocess import preprocess_reference

OK, WHY = D.dali_available("cpu", media="image")
pytestmark = pytest.mark.skipif(not OK, reason=WHY)
ENCODERS = [languagebind_encoder(), dinov2_encoder(), vivit_encoder(), siglip_encoder()]
T = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> path: downscaled and upscaled sizes, odd sizes, EXIF-rotated, grayscale, alpha."""
    root = tmp_path_factory.mktemp("dali_images")
    made = {"jpeg": ("a.jpg", 320, 240, {}), "png": ("b.png", 300, 410, {}),
            "jpeg_small_odd": ("c.jpg", 161, 97, {}), "jpeg_exif6": ("d.jpg", 250, 180, dict(exif_orientation=6)),
            "png_gray": ("e.png", 129, 200, dict(mode="L")), "png_rgba": ("f.png", 240, 240, dict(mode="RGBA"))}
    return {k: write_image(root / name, w, h, seed=i, **kw) for i, (k, (name, w, h, kw)) in enumerate(made.items())}


def decode_error(got: np.ndarray, ref: np.ndarray, kind: str) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8
    err = np.abs(got.astype(np.int16) - ref)
    tol = D.IMAGE_DECODE_TOLERANCE[kind]
    assert err.max() <= tol["max_abs"] and err.mean() <= tol["mean_abs"], (kind, err.max(), err.mean())


def reference(decoded: list[np.ndarray], encoders, flips) -> list[torch.Tensor]:
    """The torch reference on the same decoded pixels, per image (sizes differ): per encoder [B, 1, 3, S, S]."""
    specs = [encoder_input_spec(e, T) for e in encoders]
    per = [preprocess_reference(torch.from_numpy(d)[None, None], specs, torch.tensor([f]))
           for d, f in zip(decoded, flips)]
    return [torch.cat([p[e] for p in per]) for e in range(len(encoders))]


def test_available_reports_a_reason():
    ok, why = D.dali_available("cpu", media="image")
    assert ok and "image" in why
    ok_gpu, why_gpu = D.dali_available("gpu", media="image")
    assert ok_gpu == torch.cuda.is_available() and why_gpu
    with pytest.raises(ValueError):
        D.dali_available("cpu", media="audio")


@pytest.mark.parametrize("name", ["jpeg", "png", "jpeg_small_odd", "jpeg_exif6", "png_gray", "png_rgba"])
def test_cpu_decode_matches_pillow(images, name):
    """RGB, EXIF orientation applied, grayscale replicated, alpha dropped: as Pillow's decode (decode_image). PNG
    exactly; JPEG within IMAGE_DECODE_TOLERANCE (libjpeg variants differ by a level or two; measured exact here)."""
    path = images[name]
    got = D.decode_image(path, device="cpu")
    decode_error(got, read_image(path), "png" if path.suffix == ".png" else "jpeg")
    # bytes in memory decode as the file does
    assert np.array_equal(D.decode_image(path.read_bytes(), device="cpu"), got)


def test_pipeline_matches_torch_reference_one_frame_per_image(images):
    names = ["jpeg", "png", "jpeg_small_odd", "jpeg_exif6", "png_gray"]
    flips = [True, False, True, False, True]
    loader = D.DaliImageLoader(ENCODERS, batch_size=len(names), device="cpu", num_threads=2)
    inputs = [images[n] if i % 2 == 0 else images[n].read_bytes() for i, n in enumerate(names)]  # paths and bytes
    outs = loader.run_batch(inputs, flips)
    refs = reference([D.decode_image(images[n], device="cpu") for n in names], ENCODERS, flips)
    for enc, out, ref in zip(ENCODERS, outs, refs):
        assert out.shape == ref.shape == (len(names), 1, 3, 224, 224) and out.dtype == torch.float32
        err = (out - ref).abs()
        tol = D.DALI_TOLERANCE[(enc.preprocess.interpolation, enc.preprocess.antialias)]
        assert err.max() <= tol["max"] and err.mean() <= tol["mean"], (enc.name, err.max(), err.mean())
    # the caller's expansion along time gives the encoder's frame count (a static video)
    assert [o.expand(-1, e.frames, -1, -1, -1).shape[1] for o, e in zip(outs, ENCODERS)] == [16, 16, 32, 16]


def test_flip_only_where_the_spec_says_and_dtypes(images):
    path = images["jpeg_small_odd"]
    encs = [languagebind_encoder(), siglip_encoder()]
    a = D.DaliImageLoader(encs, batch_size=2, device="cpu", out_dtype=torch.float16).run_batch([path, path],
                                                                                               [False, True])
    assert all(t.dtype == torch.float16 and t.shape == (2, 1, 3, 224, 224) for t in a)
    assert torch.equal(a[0][1], a[0][0].flip(-1))  # LanguageBind mirrored for the flagged image
    assert torch.equal(a[1][1], a[1][0])  # SigLIP ignores the flag
    b = D.DaliImageLoader(encs, batch_size=2, device="cpu", out_dtype=torch.bfloat16).run_batch([path])
    assert b[0].dtype == torch.bfloat16 and b[0].shape == (1, 1, 3, 224, 224)


def test_iterate_and_broken_images_are_named(images, tmp_path):
    loader = D.DaliImageLoader(ENCODERS[:1], batch_size=2, device="cpu")
    samples = [images["jpeg"], (images["png"], True), images["png_rgba"]]
    assert [tuple(b[0].shape) for b in loader.iterate(samples)] == [(2, 1, 3, 224, 224), (1, 1, 3, 224, 224)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(images["jpeg"].read_bytes()[:40] + b"\x00" * 200)
    with pytest.raises(D.DaliDecodeError) as info:
        loader.run_batch([images["jpeg"], corrupt])
    assert set(info.value.bad) == {str(corrupt)}
    with pytest.raises(D.DaliDecodeError) as info:
        loader.run_batch([images["png"].read_bytes(), b"not an image" * 10])
    assert set(info.value.bad) == {"#1"}
    with pytest.raises(D.DaliDecodeError):
        D.decode_image(b"\xff\xd8 truncated", device="cpu")
    assert loader.run_batch([images["jpeg"]])[0].shape == (1, 1, 3, 224, 224)  # the loader recovers


@pytest.mark.gpu
def test_mixed_nvjpeg_decode_and_preprocess(images):
    ok, why = D.dali_available("gpu", media="image")
    if not ok:
        pytest.skip(why)
    names = ["jpeg", "png", "jpeg_small_odd", "jpeg_exif6"]
    decoded = []
    for n in names:
        got = D.decode_image(images[n], device="gpu")
        decode_error(got, read_image(images[n]), "png" if images[n].suffix == ".png" else "jpeg")
        decoded.append(got)
    flips = [True, False, False, True]
    outs = D.DaliImageLoader(ENCODERS, batch_size=4, device="gpu").run_batch([images[n] for n in names], flips)
    refs = reference(decoded, ENCODERS, flips)
    for enc, out, ref in zip(ENCODERS, outs, refs):
        assert out.is_cuda and out.shape == (4, 1, 3, 224, 224)
        err = (out.cpu() - ref).abs()
        tol = D.DALI_TOLERANCE[(enc.preprocess.interpolation, enc.preprocess.antialias)]
        assert err.max() <= tol["max"] and err.mean() <= tol["mean"], (enc.name, err.max(), err.mean())
