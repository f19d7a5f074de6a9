"""Projection + fusion equals the release's formulation built on nn.MultiheadAttention, and its gradients follow
the algebra of MERV_SPEC.md section 4."""

import math

import pytest
import torch

from merv_fast.config import get_preset
from merv_fast.kernels.project_fuse import ReleaseFusion, fusion_weights_from_logits, project_fuse_reference
from merv_fast.model.visual import VisualPath


def release_fusion(visual: VisualPath, pooled: list[torch.Tensor]) -> torch.Tensor:
    return ReleaseFusion([p.weight for p in visual.projectors], [p.bias for p in visual.projectors],
                         visual.fusion.weights(), visual.fusion.attention.state_dict())(pooled)


def make_visual(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    visual = VisualPath(cfg, llm_dim=72).to(dtype)
    L = cfg.visual.num_tokens
    pooled = [torch.randn(3, L, e.hidden_size, dtype=dtype) for e in cfg.encoders]
    return visual, pooled


def test_fusion_matches_multihead_attention_float32():
    visual, pooled = make_visual(torch.float32, seed=1)
    with torch.no_grad():  # non-zero biases so that the bias handling is checked too
        visual.fusion.attention.in_proj_bias.normal_()
        visual.fusion.query.mul_(5)
    pooled_dtype = [p.float() for p in pooled]
    ours, mix = project_fuse_reference(pooled_dtype, [p.weight for p in visual.projectors],
                                       [p.bias for p in visual.projectors], visual.fusion.weights())
    torch.testing.assert_close(ours, release_fusion(visual, pooled_dtype), rtol=1e-5, atol=1e-5)
    assert mix.shape == (3, 4) and not torch.allclose(mix, torch.full_like(mix, 0.25))
    torch.testing.assert_close(mix.sum(-1), torch.ones(3))


def test_gradients_follow_the_spec_algebra():
    visual, pooled = make_visual(torch.float64, seed=2)
    with torch.no_grad():
        visual.fusion.attention.in_proj_bias.normal_()
    pooled = [p.requires_grad_() for p in pooled]
    fw = visual.fusion.weights()
    out, mix = project_fuse_reference(pooled, [p.weight for p in visual.projectors],
                                      [p.bias for p in visual.projectors], fw)
    dy = torch.randn_like(out)
    (out * dy).sum().backward()
    # The key bias cancels in the softmax: its gradient is exactly zero (absolute tolerance, never relative).
    bk_grad = visual.fusion.attention.in_proj_bias.grad[visual.fusion.embed_dim: 2 * visual.fusion.embed_dim]
    assert bk_grad.abs().max() < 1e-12
    # Never-computed parameters get no gradient at all.
    assert visual.fusion.attention.v_proj_weight.grad is None
    assert visual.fusion.attention.out_proj.weight.grad is None
    # dL/dw_e = <pooled_e^T dY, W_e^T> + (sum_n dY[n]) . b_e, checked through an explicit mix-weight leaf.
    mix_leaf = mix.detach().requires_grad_()
    projected = [proj(x) for proj, x in zip(visual.projectors, pooled)]
    fused = sum(mix_leaf[:, e, None, None] * projected[e] for e in range(len(projected)))
    (fused * dy).sum().backward()
    for e, (proj, x) in enumerate(zip(visual.projectors, pooled)):
        expected = torch.einsum("blc,bld,dc->b", x.detach(), dy, proj.weight.detach()) + dy.sum(1) @ proj.bias.detach()
        torch.testing.assert_close(mix_leaf.grad[:, e], expected)


def test_projectors_receive_gradient_through_the_keys():
    """W_e gets gradient from the output AND from k_e = mean(pooled_e) W_e^T + b_e."""
    visual, pooled = make_visual(torch.float64, seed=3)
    weights = [p.weight for p in visual.projectors]
    biases = [p.bias for p in visual.projectors]
    fw = visual.fusion.weights()
    out, mix = project_fuse_reference(pooled, weights, biases, fw)
    dy = torch.randn_like(out)
    full = torch.autograd.grad((out * dy).sum(), weights[0], retain_graph=True)[0]
    frozen_mix = mix.detach()
    outputs_only = sum(frozen_mix[:, e, None, None] * torch.nn.functional.linear(pooled[e], weights[e], biases[e])
                       for e in range(4))
    direct = torch.autograd.grad((outputs_only * dy).sum(), weights[0])[0]
    assert not torch.allclose(full, direct)  # the key path contributes


def test_single_encoder_output_is_its_projection():
    x = torch.randn(2, 8, 5)
    w, b = torch.randn(7, 5), torch.randn(7)
    out, mix = project_fuse_reference([x], [w], [b], None)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))
    with pytest.raises(ValueError):
        project_fuse_reference([x, x], [w, w], [b, b], None)


def test_scaling_is_one_over_sqrt_embed_dim():
    visual, pooled = make_visual(torch.float64, seed=4)
    fw = visual.fusion.weights()
    keys = torch.stack([p(x).mean(1) for p, x in zip(visual.projectors, pooled)], 1)
    q = fw.query @ fw.q_weight.T + fw.q_bias
    k = keys @ fw.k_weight.T + fw.k_bias
    expected = torch.softmax((k @ q.T).squeeze(-1) / math.sqrt(visual.fusion.embed_dim), -1)
    torch.testing.assert_close(fusion_weights_from_logits(keys, fw), expected)
