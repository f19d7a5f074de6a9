"""merv_fast.data.preprocess.preprocess_batch: a collated batch's frames (one stacked tensor or a list of per-sample
tensors of different sizes; videos or one-frame images) -> every encoder's input, in batch order."""

import pytest
import torch

from merv_fast.config import dinov2_encoder, languagebind_encoder, siglip_encoder, vivit_encoder
from merv_fast.data import preprocess as P
from merv_fast.data.preprocess import preprocess_all, preprocess_batch

ENCODERS = [languagebind_encoder(), dinov2_encoder(), vivit_encoder(), siglip_encoder()]
T = 32
SIZES = [(48, 64), (61, 45), (48, 64), (33, 33), (61, 45)]  # interleaved: three distinct sizes, repeats apart


def frames_of(shape_hw, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, *shape_hw, 3), generator=g, dtype=torch.uint8)


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused op's calls (and the batch size of each)."""
    seen = []
    real = P._op.preprocess

    def counting(frames, specs, flip=None):
        seen.append(tuple(frames.shape))
        return real(frames, specs, flip)

    monkeypatch.setattr(P._op, "preprocess", counting)
    return seen


def per_sample(sample, flip_one, t=T):
    return preprocess_all(sample.unsqueeze(0), ENCODERS, t, torch.tensor([flip_one]))


def test_list_of_mixed_sizes_equals_per_sample_in_order(calls):
    samples = [frames_of(hw, T, seed=i) for i, hw in enumerate(SIZES)]
    flip = torch.tensor([True, False, False, True, True])
    outs = preprocess_batch(samples, ENCODERS, T, flip)
    if P._op.native_reason() is None:  # the native op writes each sample into its batch row: no grouped call
        assert calls == []
    else:  # one fused call per distinct size, scattered into batch order
        assert len(calls) == 3 and sorted(c[0] for c in calls) == [1, 2, 2]
    for enc, out in zip(ENCODERS, outs):
        assert out.shape == (len(SIZES), enc.frames, 3, 224, 224) and out.dtype == torch.float32
    for i, s in enumerate(samples):  # sample i's inputs at row i, exactly as preprocessing it alone
        for out, ref in zip(outs, per_sample(s, bool(flip[i]))):
            assert torch.equal(out[i], ref[0]), i


def test_mixed_sizes_take_the_grouped_path_without_the_native_op(calls, monkeypatch):
    monkeypatch.setattr(P._op, "native_reason", lambda: "native library disabled for this test")
    samples = [frames_of(hw, T, seed=i) for i, hw in enumerate(SIZES)]
    flip = torch.tensor([False, True, True, False, True])
    outs = preprocess_batch(samples, ENCODERS, T, flip, dtype=torch.bfloat16)
    assert len(calls) == 3 and sorted(c[0] for c in calls) == [1, 2, 2]
    for i, s in enumerate(samples):
        refs = preprocess_all(s.unsqueeze(0), ENCODERS, T, flip[i:i + 1], dtype=torch.bfloat16)
        assert all(o.dtype == torch.bfloat16 and torch.equal(o[i], r[0]) for o, r in zip(outs, refs)), i


def test_stacked_tensor_is_one_call_and_equals_preprocess_all(calls):
    frames = torch.stack([frames_of((40, 52), T, seed=i) for i in range(3)])
    flip = torch.tensor([False, True, False])
    outs = preprocess_batch(frames, ENCODERS, T, flip, dtype=torch.bfloat16)
    assert len(calls) == 1
    refs = preprocess_all(frames, ENCODERS, T, flip, dtype=torch.bfloat16)
    assert all(o.dtype == torch.bfloat16 and torch.equal(o, r) for o, r in zip(outs, refs))
    # a list whose samples share one size is the same single call
    again = preprocess_batch(list(frames), ENCODERS, T, flip, dtype=torch.bfloat16)
    assert len(calls) == 3 and all(torch.equal(o, r) for o, r in zip(again, refs))  # (the reference was call 2)


@pytest.mark.parametrize("stacked", [True, False])
def test_image_expansion_equals_the_repeated_frames_exactly(calls, stacked):
    sizes = [(50, 70)] * 3 if stacked else [(50, 70), (64, 31), (50, 70)]
    images = [frames_of(hw, 1, seed=10 + i) for i, hw in enumerate(sizes)]
    flip = torch.tensor([True, False, True])
    arg = torch.stack(images) if stacked else images
    outs = preprocess_batch(arg, ENCODERS, T, flip, is_image=torch.tensor([True, True, True]))
    assert all(c[1] == 1 for c in calls)  # the op saw ONE frame per image, never 32
    for enc, out in zip(ENCODERS, outs):
        assert out.shape == (3, enc.frames, 3, 224, 224) and out.stride(1) == 0  # an expand view along time
    for i, img in enumerate(images):  # the static video the spec defines: the frame repeated frames_sampled times
        for out, ref in zip(outs, per_sample(img.expand(T, -1, -1, -1), bool(flip[i]))):
            assert torch.equal(out[i], ref[0]), i


def test_flip_applies_per_sample_and_only_where_the_spec_says():
    s = frames_of((45, 60), T, seed=3)
    outs = preprocess_batch([s, s, s], ENCODERS, T, torch.tensor([False, True, False]))
    for enc, out in zip(ENCODERS, outs):
        assert torch.equal(out[0], out[2])
        if enc.preprocess.random_flip:  # LanguageBind
            assert torch.equal(out[1], out[0].flip(-1)) and not torch.equal(out[1], out[0])
        else:
            assert torch.equal(out[1], out[0])
    img = frames_of((45, 60), 1, seed=4)
    outs = preprocess_batch([img, img], ENCODERS, T, torch.tensor([True, False]), is_image=True)
    assert torch.equal(outs[0][0], outs[0][1].flip(-1)) and torch.equal(outs[1][0], outs[1][1])


def test_encoders_take_the_expanded_view_unchanged():
    """MERV.encode on the expand view equals it on a contiguous copy, bit for bit (the video encoders copy the view
    in flatten(0, 1) / their tubelet conv; the per-frame encoders read one frame): no .contiguous() needed."""
    from merv_fast.model.merv import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    cfg = model.config
    px = preprocess_batch([frames_of((40, 56), 1, seed=5)], cfg.encoders, cfg.frames_sampled,
                          torch.tensor([True]), is_image=True)
    assert any(p.stride(1) == 0 for p in px)
    got = model.encode(px, is_image=True)
    ref = model.encode([p.contiguous() for p in px], is_image=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_bad_input_is_named():
    video = frames_of((20, 20), T, seed=0)
    image = frames_of((20, 20), 1, seed=0)
    with pytest.raises(ValueError, match="mixes images and videos"):
        preprocess_batch([image, image], ENCODERS, T, is_image=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="an image needs 1 frame"):
        preprocess_batch([video], ENCODERS, T, is_image=True)
    with pytest.raises(ValueError, match="sampled frames"):
        preprocess_batch([image], ENCODERS, T)
    with pytest.raises(ValueError, match="flip"):
        preprocess_batch([video, video], ENCODERS, T, torch.tensor([True]))
