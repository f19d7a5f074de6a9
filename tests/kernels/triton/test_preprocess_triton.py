"""The Triton preprocessing kernel (kernels/preprocess_triton.py) against `preprocess_reference`
(kernels/preprocess.py).

Tolerances, in normalised units ((x/255 - mean) / std):
- fp32 outputs: |kernel - reference| < 1e-4. Measured ~1e-5, and that is the reference's own error: torch computes
  its source coordinates in fp32 (scale = in/out rounded), which moves bilinear weights by ~1e-6 of a pixel value
  step; the kernel's host-side taps are float64, and it is within 2e-6 of a float64 reference (checked below).
- fp16/bf16 outputs: one rounding step of the output dtype (eps * |value|) on top of that: the kernel rounds its own
  fp32 result, which can sit on the other side of a rounding boundary from the reference's.

Fresh random frames every run; the seed is in every failure message (replay with MERV_TEST_SEED=<seed>). Output
buffers are NaN-filled where the test passes them in, so an element the kernel never writes fails the comparison.
Shapes are small and odd (37x53, 64x48, an upscaled 20x19) so that each test takes well under 2 s in the interpreter.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from merv_fast.kernels.dispatch import use_backend
from merv_fast.kernels.preprocess import EncoderInputSpec, preprocess, preprocess_reference, resize_reference
from merv_fast.kernels.preprocess_triton import preprocess_triton, resize_matrix

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
FP32_TOL = 1e-4
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def release_specs(size: int, dtype=torch.float32) -> list[EncoderInputSpec]:
    """The four encoders' modes (config.py): LanguageBind (short side + crop, bilinear, flip), DINOv2, ViViT, SigLIP."""
    return [
        EncoderInputSpec(size, "short_side_crop", "bilinear", False, CLIP_MEAN, CLIP_STD, frame_stride=2,
                         random_flip=True, out_dtype=dtype),
        EncoderInputSpec(size, "squash", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD, frame_stride=2,
                         out_dtype=dtype),
        EncoderInputSpec(size, "squash", "bilinear", True, HALF, HALF, frame_stride=1, out_dtype=dtype),
        EncoderInputSpec(size, "squash", "bicubic", True, HALF, HALF, frame_stride=2, out_dtype=dtype),
    ]


@pytest.fixture
def seeded():
    seed = int(os.environ.get("MERV_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    return torch.Generator().manual_seed(seed), seed


def draw_frames(gen, b, t, h, w):
    return torch.randint(0, 256, (b, t, h, w, 3), generator=gen, dtype=torch.uint8)


def poisoned(frames, specs):
    b, t = frames.shape[:2]
    return [torch.full((b, -(-t // s.frame_stride), 3, s.size, s.size), float("nan"), dtype=s.out_dtype,
                       device=frames.device) for s in specs]


def assert_close(got, want, spec, context):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype == spec.out_dtype, context
    assert not torch.isnan(got).any(), f"{context}: unwritten (NaN) elements"
    diff = (got.double() - want.double()).abs()
    allowed = FP32_TOL + EPS.get(spec.out_dtype, 0.0) * want.double().abs()
    worst = (diff - allowed).max().item()
    assert worst <= 0, f"{context}: max |diff| {diff.max().item():.3g} exceeds the tolerance by {worst:.3g}"


@pytest.mark.parametrize("hw", [(37, 53), (64, 48), (20, 19)], ids=["37x53", "64x48", "upscale_20x19"])
@pytest.mark.parametrize("size", [28, 32])
def test_release_modes_fp32_poisoned(hw, size, seeded, device):
    gen, seed = seeded
    frames = draw_frames(gen, 2, 4, *hw)
    flip = torch.tensor([True, False])
    specs = release_specs(size)
    got = preprocess_triton(frames.to(device), specs, flip.to(device), out=poisoned(frames.to(device), specs))
    want = preprocess_reference(frames, specs, flip)
    for spec, g, w in zip(specs, got, want):
        assert_close(g, w, spec, f"seed {seed}, {hw} -> {spec}")


def test_flip_per_sample(seeded, device):
    """Only samples with flip set are mirrored, only for the spec that flips; flip=None mirrors nothing."""
    gen, seed = seeded
    frames = draw_frames(gen, 2, 4, 37, 53)
    specs = release_specs(28)[:2]
    for flip in (torch.tensor([False, True]), torch.tensor([True, True]), None):
        got = preprocess_triton(frames.to(device), specs, None if flip is None else flip.to(device))
        want = preprocess_reference(frames, specs, flip)
        for spec, g, w in zip(specs, got, want):
            assert_close(g, w, spec, f"seed {seed}, flip {flip}, {spec}")
    unflipped = preprocess_triton(frames.to(device), specs[:1], None)[0].cpu()
    flipped = preprocess_triton(frames.to(device), specs[:1], torch.tensor([True, False]).to(device))[0].cpu()
    # Not bit-equal: a mirrored column meets its weights in another position of the fp32 products.
    assert (flipped[0] - unflipped[0].flip(-1)).abs().max() < 1e-5, f"seed {seed}"
    assert (flipped[1] - unflipped[1]).abs().max() < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_poisoned(dtype, seeded, device):
    gen, seed = seeded
    frames = draw_frames(gen, 2, 4, 64, 48)
    flip = torch.tensor([False, True])
    specs = release_specs(32, dtype)
    got = preprocess_triton(frames.to(device), specs, flip.to(device), out=poisoned(frames.to(device), specs))
    want = preprocess_reference(frames, specs, flip)
    for spec, g, w in zip(specs, got, want):
        assert_close(g, w, spec, f"seed {seed}, {dtype}, {spec}")


def test_filters_outside_the_release(seeded, device):
    """Modes no encoder uses, for the filter code paths: bicubic without antialias (a = -0.75, clamped taps),
    short_side_crop with antialiased bicubic on a tall frame, bilinear without antialias upscaling."""
    gen, seed = seeded
    frames = draw_frames(gen, 2, 3, 53, 30)
    specs = [EncoderInputSpec(28, "squash", "bicubic", False, HALF, HALF, frame_stride=1),
             EncoderInputSpec(24, "short_side_crop", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD, frame_stride=2,
                              random_flip=True),
             EncoderInputSpec(64, "squash", "bilinear", False, CLIP_MEAN, CLIP_STD, frame_stride=3)]
    flip = torch.tensor([True, False])
    got = preprocess_triton(frames.to(device), specs, flip.to(device), out=poisoned(frames.to(device), specs))
    want = preprocess_reference(frames, specs, flip)
    for spec, g, w in zip(specs, got, want):
        assert_close(g, w, spec, f"seed {seed}, {spec}")


def test_strided_frames_and_outputs(seeded, device):
    """Frames inside a wider buffer (every stride non-trivial) and outputs that are slices of wider buffers."""
    gen, seed = seeded
    wide = draw_frames(gen, 2, 5, 40, 60).to(device)
    frames = wide[:, 1:, 2:39, 3:56]  # [2, 4, 37, 53, 3], not contiguous
    specs = release_specs(28)[1:3]
    outs = [torch.full((2, -(-4 // s.frame_stride), 3, 28, 31), float("nan"), device=device)[..., 2:30]
            for s in specs]
    got = preprocess_triton(frames, specs, None, out=outs)
    want = preprocess_reference(frames.cpu().contiguous(), specs)
    for spec, g, w in zip(specs, got, want):
        assert_close(g, w, spec, f"seed {seed}, strided, {spec}")


def test_against_float64(seeded, device):
    """The kernel is closer to an exact (float64) resize than the fp32 reference is: its taps are float64 on the
    host and its sums fp32."""
    gen, seed = seeded
    frames = draw_frames(gen, 2, 4, 37, 53)
    for spec in release_specs(28):
        got = preprocess_triton(frames.to(device), [spec])[0].cpu().double()
        x = frames[:, ::spec.frame_stride].permute(0, 1, 4, 2, 3).double() / 255.0
        b, t = x.shape[:2]
        x = resize_reference(x.reshape(b * t, 3, 37, 53), spec).reshape(b, t, 3, 28, 28)
        mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64).view(1, 1, 3, 1, 1)
        err = (got - (x - mean) / std).abs().max().item()
        assert err < 2e-6, f"seed {seed}, {spec}: {err:.3g} from the float64 resize"


def test_resize_matrix_is_torch_interpolate():
    """The host-side taps equal F.interpolate in float64, along each axis, for every filter, down and up."""
    gen = torch.Generator().manual_seed(0)
    for h, w, oh, ow in [(37, 53, 28, 40), (240, 321, 28, 28), (20, 19, 32, 13), (7, 300, 7, 17)]:
        x = torch.rand(1, 3, h, w, generator=gen, dtype=torch.float64)
        for mode in ("bilinear", "bicubic"):
            for antialias in (False, True):
                want = F.interpolate(x, size=(oh, ow), mode=mode, antialias=antialias, align_corners=False)
                wv = torch.from_numpy(resize_matrix(h, oh, mode, antialias))
                wh = torch.from_numpy(resize_matrix(w, ow, mode, antialias))
                got = torch.einsum("rh,nchw,jw->ncrj", wv, x, wh)
                err = (got - want).abs().max().item()
                assert err < 1e-12, f"{(h, w)} -> {(oh, ow)} {mode} antialias={antialias}: {err:.3g}"


def test_dispatch_routes_to_triton(seeded, device, monkeypatch):
    """`preprocess` sends CUDA frames (and CPU frames in the interpreter) to the kernel, and the torch backend back."""
    import merv_fast.kernels.preprocess_triton as module

    gen, seed = seeded
    frames = draw_frames(gen, 1, 2, 37, 53).to(device)
    specs = release_specs(28)[2:3]
    calls = []
    real = module.preprocess_triton
    monkeypatch.setattr(module, "preprocess_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with use_backend("auto"):
        via_dispatch = preprocess(frames, specs)
    assert calls == [1]
    assert_close(via_dispatch[0], preprocess_reference(frames.cpu(), specs)[0], specs[0], f"seed {seed}")
    with use_backend("torch"):
        preprocess(frames, specs)
    assert calls == [1]


def strategy_specs(size: int) -> list[EncoderInputSpec]:
    """The release's resize-crop and letterbox per timm encoder (config.py PREPROCESS): torchvision's short-side
    Resize (ViViT's to 256/224 of the size) and CenterCrop, with and without the letterbox pad."""
    imagenet_fill, half_fill = tuple(int(m * 255) for m in IMAGENET_MEAN), (127, 127, 127)
    return [
        EncoderInputSpec(size, "resize_crop", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD, frame_stride=2),
        EncoderInputSpec(size, "resize_crop", "bilinear", True, HALF, HALF, short_side=round(size * 256 / 224)),
        EncoderInputSpec(size, "resize_crop", "bicubic", True, IMAGENET_MEAN, IMAGENET_STD,
                         letterbox_fill=imagenet_fill),
        EncoderInputSpec(size, "resize_crop", "bilinear", True, HALF, HALF, short_side=round(size * 256 / 224),
                         letterbox_fill=half_fill, frame_stride=2),
    ]


@pytest.mark.parametrize("hw", [(37, 53), (64, 47), (20, 19)], ids=["37x53", "64x47_odd_pad", "upscale_20x19"])
def test_resize_strategies_poisoned(hw, seeded, device):
    gen, seed = seeded
    frames = draw_frames(gen, 2, 4, *hw)
    specs = strategy_specs(28)
    got = preprocess_triton(frames.to(device), specs, None, out=poisoned(frames.to(device), specs))
    want = preprocess_reference(frames, specs, None)
    for spec, g, w in zip(specs, got, want):
        assert_close(g, w, spec, f"seed {seed}, {hw}, {spec.resize} short_side={spec.short_side} "
                                 f"letterbox={spec.letterbox_fill}")
