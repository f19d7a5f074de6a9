"""The native fused preprocessing op (kernels/csrc/preprocess.cpp) against `preprocess_reference` (kernels/preprocess.py).

Tolerances, in normalised units ((x/255 - mean) / std):
- fp32: |native - reference| < 1e-4 (FP32_TOL). Measured <= ~5e-6: the op's filter tables repeat torch's float
  arithmetic (float scale, source coordinates with one rounding), so only the summation order and the folded
  /255-mean-std multiply-add differ.
- bf16/fp16: the op rounds its own fp32 result once (round to nearest even), so it is within half a step of the
  output dtype (eps/2 * |value|) of the fp32 reference, plus the fp32 tolerance.
Outputs are also written into NaN-filled buffers (`preprocess_native_out`), so an element never written fails.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import merv_fast.data.preprocess as data_preprocess  # wires the op's native check to merv_fast.native
from merv_fast import native
from merv_fast.config import get_preset
from merv_fast.kernels import preprocess as kp
from merv_fast.kernels.preprocess import (EncoderInputSpec, preprocess, preprocess_native_out, preprocess_reference,
                                          short_side_geometry)

FP32_TOL = 1e-4
HALF_STEP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # eps / 2 of each dtype
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

needs_native = pytest.mark.skipif(native.op_reason("preprocess_frames") is not None,
                                  reason=f"native op unavailable: {native.op_reason('preprocess_frames')}")


def natural_frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] that look like video: smooth colour fields, hard-edged shapes, a little noise."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(b * t, 3, 5, 7, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    boxes = ((yy > 0.3) & (yy < 0.6) & (xx > 0.2) & (xx < 0.5)).float() * 0.6
    stripes = ((xx * 23).floor() % 2) * (yy > 0.75).float() * 0.5
    x = smooth * 0.7 + boxes + stripes + 0.04 * torch.randn(b * t, 3, h, w, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.view(b, t, 3, h, w).permute(0, 1, 3, 4, 2).contiguous()


def preset_specs(preset: str, frames: int, dtype=torch.float32) -> list[EncoderInputSpec]:
    """The preset's encoder specs, strides scaled from its frames_sampled down to `frames` frames (at least 1)."""
    cfg = get_preset(preset)
    specs = [data_preprocess.encoder_input_spec(e, cfg.frames_sampled, dtype) for e in cfg.encoders]
    shrink = cfg.frames_sampled // frames
    return [dataclasses.replace(s, frame_stride=max(1, s.frame_stride * frames // cfg.frames_sampled))
            if shrink > 1 else s for s in specs]


def poisoned(frames: torch.Tensor, specs) -> list[torch.Tensor]:
    return [torch.full(shape, float("nan"), dtype=s.out_dtype)
            for shape, s in zip(kp.output_shapes(frames.shape, specs), specs)]


def assert_close(got, want, specs, label=""):
    assert len(got) == len(want)
    for g, r, s in zip(got, want, specs):
        assert g.shape == r.shape and g.dtype == s.out_dtype, (label, s, g.shape, r.shape, g.dtype)
        assert torch.isfinite(g).all(), (label, s)
        err = (g.float() - r.float()).abs()
        if s.out_dtype == torch.float32:
            assert err.max().item() < FP32_TOL, (label, s, err.max().item())
        else:
            bound = HALF_STEP[s.out_dtype] * r.float().abs() + FP32_TOL
            assert (err <= bound).all(), (label, s, err.max().item())


def check(frames, specs, flip=None, label=""):
    """Native (returned and written into poisoned buffers) against the fp32 reference cast at the end."""
    want = preprocess_reference(frames, [dataclasses.replace(s, out_dtype=torch.float32) for s in specs], flip)
    assert_close(preprocess(frames, specs, flip), want, specs, label)
    assert_close(preprocess_native_out(frames, specs, flip, poisoned(frames, specs)), want, specs, label + " out=")


@needs_native
@pytest.mark.parametrize("preset,frames_t", [("merv-7b", 4), ("tiny", 4)])
@pytest.mark.parametrize("hw", [(240, 320), (321, 239)])
def test_presets(preset, frames_t, hw):
    specs = preset_specs(preset, frames_t)
    assert [s.random_flip for s in specs] == [True, False, False, False]  # only LanguageBind flips
    frames = natural_frames(2, frames_t, *hw, seed=hw[0])
    check(frames, specs, torch.tensor([True, False]), f"{preset} {hw}")
    check(frames, specs, None, f"{preset} {hw} no flip")


ALL_MODES = [(r, i, a) for r in ("squash", "short_side_crop") for i in ("bilinear", "bicubic") for a in (False, True)]


@needs_native
@pytest.mark.parametrize("h,w,size", [
    (1, 1, 4), (1, 9, 5), (9, 1, 5), (2, 2, 1),  # 1-pixel edges, a 1-pixel output
    (7, 300, 16), (300, 7, 16),  # wide and tall, strong downscale on one side, upscale on the other
    (17, 23, 64), (33, 31, 100),  # upscale
    (224, 227, 224), (224, 229, 224), (229, 224, 224),  # odd crop excess: offset rounds half to even
    (97, 61, 40),
])
def test_odd_sizes(h, w, size):
    specs = [EncoderInputSpec(size, r, i, a, CLIP_MEAN, CLIP_STD, frame_stride=1 + k % 3)
             for k, (r, i, a) in enumerate(ALL_MODES)]
    check(natural_frames(2, 5, h, w, seed=h * w), specs, None, f"{h}x{w}->{size}")


def test_crop_offsets_round_half_to_even():
    assert short_side_geometry(240, 320, 224) == (224, 298, 0, 37)
    assert short_side_geometry(224, 227, 224)[3] == 2  # round(1.5) = 2
    assert short_side_geometry(224, 229, 224)[3] == 2  # round(2.5) = 2, not 3
    assert short_side_geometry(231, 224, 224)[2] == 4  # round(3.5) = 4


@needs_native
def test_flip_only_where_asked():
    frames = natural_frames(3, 2, 50, 70)
    base = dict(size=32, resize="short_side_crop", interpolation="bilinear", antialias=False, mean=CLIP_MEAN,
                std=CLIP_STD)
    specs = [EncoderInputSpec(**base, random_flip=True), EncoderInputSpec(**base, random_flip=False)]
    flip = torch.tensor([True, False, True])
    flipping, steady = preprocess(frames, specs, flip)
    unflipped = preprocess(frames, specs[1:], None)[0]
    assert torch.equal(steady, unflipped)
    assert torch.equal(flipping[flip], unflipped[flip].flip(-1))
    assert torch.equal(flipping[~flip], unflipped[~flip])
    check(frames, specs, flip)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs(dtype):
    specs = preset_specs("tiny", 4, dtype)
    check(natural_frames(2, 4, 90, 120), specs, torch.tensor([False, True]), str(dtype))


@needs_native
def test_non_contiguous_input():
    specs = preset_specs("tiny", 4)
    planar = natural_frames(2, 8, 61, 83).permute(0, 1, 4, 2, 3).contiguous()  # stored [B, T, 3, H, W]
    channels_apart = planar.permute(0, 1, 3, 4, 2)[:, 1::2]  # a view: channel stride H*W, every other frame
    assert not channels_apart.is_contiguous()
    check(channels_apart, specs, torch.tensor([True, False]), "channels apart")
    wide = natural_frames(2, 4, 40, 120)[:, :, :, 10:100:2]  # column stride 6 bytes
    check(wide, specs, None, "strided columns")


@needs_native
def test_data_path_routes_through_op():
    """merv_fast.data.preprocess gives the same results on the native op as on the reference (its old code)."""
    cfg = get_preset("tiny")
    frames = natural_frames(2, cfg.frames_sampled, 48, 64)
    flip = torch.tensor([True, False])
    fast = data_preprocess.preprocess_all(frames, cfg.encoders, cfg.frames_sampled, flip)
    previous = kp.set_native_check(lambda: "simulated: no native library")
    try:
        slow = data_preprocess.preprocess_all(frames, cfg.encoders, cfg.frames_sampled, flip)
        one = data_preprocess.preprocess_for_encoder(frames, cfg.encoders[0], cfg.frames_sampled, flip,
                                                     torch.bfloat16)
    finally:
        kp.set_native_check(previous)
    for f, s, e in zip(fast, slow, cfg.encoders):
        assert f.shape == (2, e.frames, 3, e.image_size, e.image_size)
        assert (f - s).abs().max().item() < FP32_TOL
    assert one.dtype == torch.bfloat16 and torch.equal(one, slow[0].to(torch.bfloat16))


def test_fallback_when_unavailable(monkeypatch, capsys):
    """A library built against another torch is refused by the loader's check, with one line, and the op file
    then runs the reference: simulated by changing the running torch version seen by that same check."""
    frames = natural_frames(1, 2, 30, 40)
    specs = preset_specs("tiny", 2)
    info = "compiler: gcc; torch: 2.13.0"
    assert native.torch_version_mismatch(info, "2.13.0+cpu") is None
    assert native.torch_version_mismatch(info, "2.13.0a0+git1234") is None
    assert "built against torch 2.13.0, running torch 2.12.1" in native.torch_version_mismatch(info, "2.12.1")
    assert native.torch_version_mismatch("no version here", "2.13.0") is not None

    if native.native_available():
        monkeypatch.setattr(torch, "__version__", "1.0.0")
        native._load.cache_clear()
        try:
            reason = native.op_reason("preprocess_frames")
            assert reason and "running torch 1.0.0" in reason
            assert not native.native_available() and native.build_info() is None
            notice = capsys.readouterr().err.strip().splitlines()
            assert len(notice) == 1 and "not using the native library" in notice[0]
            assert kp.native_reason() == reason  # the dispatch asks the same check
            out = preprocess(frames, specs)
        finally:
            monkeypatch.undo()
            native._load.cache_clear()
        assert native.native_available()
    else:
        assert kp.native_reason() is not None
        out = preprocess(frames, specs)
    ref = preprocess_reference(frames, specs)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))  # bit-identical: the reference ran


def _second_pass_support(n_in: int, n_out: int, radius: float) -> list[tuple[int, int]]:
    """For each output index of a 1-D antialiased resize, the input indices its filter can touch (PIL's support:
    the filter radius times the downscale factor around the centre), one index of slack on each side."""
    scale = n_in / n_out
    reach = radius * max(scale, 1.0)
    return [(max(0, math.floor((r + 0.5) * scale - reach) - 1), min(n_in, math.ceil((r + 0.5) * scale + reach) + 1))
            for r in range(n_out)]


def pil_clip_affected(frame: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """bool [size, size]: the output pixels where PIL's clipping can change the result. PIL resizes in two 1-D
    passes (it picks the order; found here by redoing each order with single-axis resizes) and stores the first
    pass as uint8, clipping it to [0, 255]: every output pixel whose second-pass support holds a first-pass value
    outside [0, 1] is affected, and so is every output value outside [0, 1] (clipped at the end)."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    h, w = frame.shape[:2]
    image = Image.fromarray(frame.numpy())
    full = np.asarray(image.resize((size, size), pil_filter))
    rows_first = np.asarray(image.resize((w, size), pil_filter))
    vertical_first = np.array_equal(np.asarray(Image.fromarray(rows_first).resize((size, size), pil_filter)), full)
    x = frame.permute(2, 0, 1)[None].float() / 255
    first = F.interpolate(x, size=(size, w) if vertical_first else (h, size), mode=interpolation,
                          align_corners=False, antialias=True)[0]
    eps = 1e-6  # float sums of a constant region land a rounding error away from 0 or 1: PIL clips nothing there
    clipped = ((first < -eps) | (first > 1 + eps)).any(0)  # [size, w] or [h, size]
    radius = {"bilinear": 1.0, "bicubic": 2.0}[interpolation]
    affected = torch.zeros(size, size, dtype=torch.bool)
    if vertical_first:  # second pass along columns
        for c, (lo, hi) in enumerate(_second_pass_support(w, size, radius)):
            affected[:, c] = clipped[:, lo:hi].any(1)
    else:
        for r, (lo, hi) in enumerate(_second_pass_support(h, size, radius)):
            affected[r] = clipped[lo:hi].any(0)
    final = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=True)[0]
    return affected | ((final < -eps) | (final > 1 + eps)).any(0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_reference_vs_pil(interpolation):
    """The antialiased reference against the release's PIL resize, in [0, 1] units. Where PIL's clipping cannot
    act, the two differ by PIL's rounding alone (its first pass stored as uint8, then the result: at most
    0.5/255 times the filter's absolute weight sum, plus 0.5/255); measured max 1.02-1.07/255 (bicubic) and
    0.99/255 (bilinear), bound 1.5/255. Where it can (bicubic overshoots at hard edges; PIL clips the uint8
    intermediate and the result, torch clips nothing): measured max 7-18/255, bounded loosely; that is 12-20% of the
    pixels of these synthetic frames with their hard-edged boxes.
    """
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    spec = EncoderInputSpec(224, "squash", interpolation, True, (0.0,) * 3, (1.0,) * 3)  # identity normalisation
    clean, clipped = [], []
    for h, w in [(360, 640), (321, 239), (100, 150)]:
        frames = natural_frames(1, 2, h, w, seed=w)
        ref = preprocess_reference(frames, [spec])[0][0]  # [T, 3, 224, 224] in [0, 1]
        for t in range(frames.shape[1]):
            pil = np.asarray(Image.fromarray(frames[0, t].numpy()).resize((224, 224), pil_filter)).copy()
            diff = (ref[t] - torch.from_numpy(pil).permute(2, 0, 1).float() / 255).abs().amax(0) * 255
            affected = pil_clip_affected(frames[0, t], 224, interpolation)
            clean.append(diff[~affected])
            clipped.append(diff[affected])
    clean, clipped = torch.cat(clean), torch.cat(clipped)
    print(f"|reference - PIL| ({interpolation}): unclipped max {clean.max():.2f}/255 mean {clean.mean():.3f}/255 over "
          f"{clean.numel()} px; clipped max {clipped.max() if clipped.numel() else 0:.2f}/255 over {clipped.numel()} px")
    assert clean.numel() > 0.75 * (clean.numel() + clipped.numel())  # the tight bound covers most pixels
    assert clean.max() < 1.5 and clean.mean() < 0.6
    if interpolation == "bilinear":
        assert clipped.numel() == 0  # the triangle filter never overshoots
    else:
        assert clipped.max() < 24.0


# ----------------------------------------------------------------------------------------------- resize strategies
def test_geometry_follows_the_release_formulas():
    import math

    for h, w in [(105, 915), (107, 107), (107, 214), (240, 320), (481, 640), (915, 105)]:
        # LanguageBind's ShortSideScale (processing_video.py:33-60): floor((long / short) * size) for the long side
        new_h, new_w, _, _ = short_side_geometry(h, w, 224)
        assert (new_h, new_w) == ((int(math.floor((h / w) * 224)), 224) if w < h else
                                  (224, int(math.floor((w / h) * 224)))), (h, w)
        # torchvision's Resize(int): the long side int(size * long / short)
        rh, rw, _, _ = kp.resize_crop_geometry(h, w, 256, 224)
        small, large = min(h, w), max(h, w)
        assert sorted((rh, rw)) == [256, int(256 * large / small)] and (rh >= rw) == (h >= w), (h, w)
    assert short_side_geometry(105, 915, 224)[:2] == (224, 1951)  # the former int(915 * (224 / 105)) gave 1952
    assert kp.letterbox_padding(481, 640) == (79, 0)  # odd difference: 639 x 640, one row short of square


def strategy_specs(size: int, dtype=torch.float32) -> list[EncoderInputSpec]:
    from merv_fast.config import IMAGENET_MEAN, IMAGENET_STD

    fill = tuple(int(m * 255) for m in IMAGENET_MEAN)
    return [EncoderInputSpec(size, "resize_crop", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD, out_dtype=dtype),
            EncoderInputSpec(size, "resize_crop", "bilinear", True, HALF, HALF, short_side=round(size * 256 / 224),
                             frame_stride=2, out_dtype=dtype),
            EncoderInputSpec(size, "resize_crop", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD, letterbox_fill=fill,
                             out_dtype=dtype),
            EncoderInputSpec(size, "resize_crop", "bilinear", True, HALF, HALF, short_side=round(size * 256 / 224),
                             letterbox_fill=(127, 127, 127), out_dtype=dtype)]


@needs_native
@pytest.mark.parametrize("h,w", [(37, 53), (64, 47), (48, 48), (19, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_strategies_native(h, w, dtype):
    check(natural_frames(2, 4, h, w, seed=h * w), strategy_specs(28, dtype), label=f"{h}x{w}")


def test_letterbox_reference_is_the_padded_frame():
    """The reference's letterbox equals padding the uint8 frame with the fill colour, then resize-crop."""
    frames = natural_frames(1, 1, 30, 44)
    spec = strategy_specs(20)[2]
    vp, hp = kp.letterbox_padding(30, 44)
    padded = torch.empty(1, 1, 30 + 2 * vp, 44 + 2 * hp, 3, dtype=torch.uint8)
    padded[...] = torch.tensor(spec.letterbox_fill, dtype=torch.uint8)
    padded[:, :, vp:vp + 30, hp:hp + 44] = frames
    plain = dataclasses.replace(spec, letterbox_fill=None)
    torch.testing.assert_close(preprocess_reference(frames, [spec])[0], preprocess_reference(padded, [plain])[0])


def test_strategies_per_encoder_from_the_config():
    from merv_fast.config import ConfigError, apply_overrides

    cfg = apply_overrides(get_preset("vivit-single"), {"visual.image_resize_strategy": "letterbox"})
    p = cfg.encoders[0].preprocess
    assert (p.resize, p.short_side, p.letterbox, p.interpolation) == ("resize_crop", 256, True, "bilinear")
    spec = data_preprocess.encoder_input_spec(cfg.encoders[0], cfg.frames_sampled)
    assert spec.letterbox_fill == (127, 127, 127) and spec.short_side == 256
    crop = apply_overrides(get_preset("dinov2-single"), {"visual.image_resize_strategy": "resize-crop"})
    assert crop.encoders[0].preprocess.resize == "resize_crop" and not crop.encoders[0].preprocess.letterbox
    with pytest.raises(ConfigError, match=r"languagebind/__init__.py:64"):
        apply_overrides(get_preset("merv-base"), {"visual.image_resize_strategy": "resize-crop"})


@pytest.mark.parametrize("strategy", ["resize-crop", "letterbox"])
def test_strategies_vs_the_release_pil_transforms(strategy):
    """The reference (hence the native and Triton ops, tested against it) against the release's PIL composition
    (merv_fast/data/release_loader.py): within the PIL rounding bound of test_reference_vs_pil, on frames whose
    letterbox padding is odd and whose crop is off-centre."""
    from merv_fast.config import apply_overrides
    from merv_fast.data.release_loader import pil_frame_transform

    for preset in ("dinov2-single-tiny", "vivit-single-tiny"):
        enc = apply_overrides(get_preset(preset), {"visual.image_resize_strategy": strategy}).encoders[0]
        spec = data_preprocess.encoder_input_spec(enc, enc.frames)
        for h, w in [(97, 150), (151, 118)]:
            frames = natural_frames(1, 1, h, w, seed=h)
            ref = preprocess_reference(frames, [dataclasses.replace(spec, frame_stride=1)])[0][0, 0]
            pil = pil_frame_transform(frames[0, 0].numpy(), enc)
            diff = ((ref - pil) * torch.tensor(enc.preprocess.std).view(3, 1, 1)).abs() * 255  # in /255 units
            assert diff.mean() < 0.6 and diff.max() < (1.5 if enc.preprocess.interpolation == "bilinear" else 24.0), \
                (preset, strategy, h, w, diff.mean().item(), diff.max().item())
