"""The assembled model: tiny forward+backward, where gradients land, images, meta builds, visual_tokens."""

import pytest
import torch

import merv_fast
from merv_fast.config import PRESETS
from merv_fast.data.preprocess import preprocess_all
from merv_fast.data.synthetic import synthetic_batches


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return merv_fast.build_model("tiny")


@pytest.fixture(scope="module")
def batch(tiny):
    b = synthetic_batches(tiny.config, batch_size=2, text_tokens=24, count=1, seed=3)[0]
    pixels = preprocess_all(b.frames, tiny.config.encoders, tiny.config.frames_sampled, b.flip)
    return b, pixels


def test_forward_backward_gradients_exactly_on_trainable_parts(tiny, batch):
    b, pixels = batch
    tiny.zero_grad(set_to_none=True)
    out = tiny(b.input_ids, b.attention_mask, b.labels, pixels=pixels)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == b.input_ids.shape[1] + tiny.num_visual_tokens
    out.loss.backward()
    for name, p in tiny.named_parameters():
        if name.startswith("encoders."):
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:  # the fusion's value/output projections: loadable, never computed
            assert name.startswith("visual.fusion.attention.") and p.grad is None, name
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.projectors.") for n in trainable) and "visual.fusion.query" in trainable
    assert any(n.startswith("llm.") for n in trainable)


def test_encoders_stay_in_eval_mode(tiny):
    tiny.train()
    assert not any(m.training for m in tiny.encoders.modules()) and tiny.llm.training


def test_visual_tokens_interface(tiny, batch):
    _, pixels = batch
    feats = tiny.encode(pixels)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 256, 64), (8, 256, 48), (8, 196, 40), (8, 196, 32)]
    tokens = tiny.visual_tokens(feats)
    assert tokens.shape == (2, 256, tiny.config.llm.hidden_size) and tiny.pool_size == (4, 8, 8)
    # any T_e and non-square grids (with `grids`) are accepted since pooling adapts
    odd = [torch.randn(2, 5, 6 * 9, f.shape[-1]) for f in feats]
    assert tiny.visual_tokens(odd, grids=[(6, 9)] * 4).shape == (2, 256, tiny.config.llm.hidden_size)


def test_image_tiling_is_exact_for_per_frame_encoders(tiny, batch):
    _, pixels = batch
    static = [p[:, :1].expand_as(p).contiguous() for p in pixels]  # an image: one frame repeated
    tiled = tiny.encode(static, is_image=True)
    full = tiny.encode(static, is_image=False)
    for name, a, b in zip(tiny.encoders, tiled, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_text_only_forward(tiny, batch):
    b, _ = batch
    out = tiny(b.input_ids, b.attention_mask, b.labels)
    assert out.logits.shape[1] == b.input_ids.shape[1] and torch.isfinite(out.loss)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_on_meta(preset):
    model = merv_fast.build_model(preset, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_visual_tokens == (1024 if "tiny" not in preset else 256)


def test_visual_path_compiles_without_graph_breaks(tiny):
    feats = [torch.randn(2, e.time_steps, e.tokens_per_step, e.hidden_size) for e in tiny.config.encoders]
    compiled = torch.compile(tiny.visual, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    out.sum().backward()
    torch.testing.assert_close(out, tiny.visual(feats), rtol=1e-5, atol=1e-5)
