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
    L = cfg.num_visual_tokens
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


# ---- The fused op on the concatenated layout (`project_fuse_concat`, custom op merv_fast::project_fuse). On CPU
# without the interpreter the op runs its torch engine: the same algebra and hand-written backward as the Triton
# path, so these tests check that backward in float64. The kernels themselves: tests/kernels/triton.

from merv_fast.kernels import use_backend  # noqa: E402
from merv_fast.kernels.project_fuse import FusionWeights, project_fuse_concat  # noqa: E402


def concat_inputs(sizes=(5, 7, 4), length=6, width=9, embed=4, seed=0, fused=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    offsets = [0]
    for c in sizes:
        offsets.append(offsets[-1] + c)
    k = offsets[-1]
    pooled = rand(2, length, k)
    fusion = FusionWeights(rand(1, embed, scale=2.0), rand(embed, embed), rand(embed), rand(embed, width),
                           rand(embed)) if fused else None
    return pooled, offsets, rand(width, k), rand(len(sizes), width), fusion


def fusion_tensors(fusion):
    return [fusion.query, fusion.q_weight, fusion.q_bias, fusion.k_weight, fusion.k_bias] if fusion else [None] * 5


def reference_on_blocks(pooled, offsets, weight, bias, fusion):
    blocks = list(zip(offsets[:-1], offsets[1:]))
    return project_fuse_reference([pooled[..., lo:hi] for lo, hi in blocks], [weight[:, lo:hi] for lo, hi in blocks],
                                  list(bias.unbind(0)), fusion)


def test_reference_gradcheck_float64():
    pooled, offsets, weight, bias, fusion = concat_inputs(length=3, width=5)
    params = [pooled, weight, bias] + fusion_tensors(fusion)

    def fn(pooled, weight, bias, *fz):
        return reference_on_blocks(pooled, offsets, weight, bias, FusionWeights(*fz))

    assert torch.autograd.gradcheck(fn, params)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_op_gradcheck_float64(fused):
    """The op's hand-written backward (softmax, keys, mix bias term, means) against finite differences."""
    sizes = (5, 7, 4) if fused else (6,)
    pooled, offsets, weight, bias, fusion = concat_inputs(sizes, length=3, width=5, fused=fused)
    means = pooled.detach().mean(1).requires_grad_()  # an input of its own, as the pooling op emits it
    inputs = [pooled, means, weight, bias] + [t for t in fusion_tensors(fusion) if t is not None]

    def fn(pooled, means, weight, bias, *fz):
        fz = list(fz) or [None] * 5
        return torch.ops.merv_fast.project_fuse(pooled, means, offsets, weight, bias, *fz)

    assert torch.autograd.gradcheck(fn, inputs)


def test_fused_op_matches_reference_with_means_from_pooled():
    """With means = pooled.mean(1) under autograd, every gradient equals the release computation's."""
    pooled, offsets, weight, bias, fusion = concat_inputs(seed=5)
    params = [pooled, weight, bias] + fusion_tensors(fusion)
    out_ref, mix_ref = reference_on_blocks(pooled, offsets, weight, bias, fusion)
    out, mix = torch.ops.merv_fast.project_fuse(pooled, pooled.mean(1), offsets, weight, bias,
                                                *fusion_tensors(fusion))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(mix, mix_ref)
    dy = torch.randn_like(out)
    ours = torch.autograd.grad((out * dy).sum() + mix[:, 1].sum(), params)
    ref = torch.autograd.grad((out_ref * dy).sum() + mix_ref[:, 1].sum(), params)
    for name, a, b in zip(["pooled", "weight", "bias", "query", "q_weight", "q_bias", "k_weight"], ours, ref):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d {name}: {m}")
    assert ours[-1].abs().max() < 1e-12 and ref[-1].abs().max() < 1e-12  # the key bias: exactly zero


def test_concat_torch_backend_is_the_reference():
    pooled, offsets, weight, bias, fusion = concat_inputs(seed=6)
    with use_backend("torch"):
        out, mix = project_fuse_concat(pooled, pooled.mean(1), offsets, weight, bias, fusion)
    out_ref, mix_ref = reference_on_blocks(pooled, offsets, weight, bias, fusion)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(mix, mix_ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        project_fuse_concat(pooled, pooled.mean(1), [0, 5, 99], weight, bias, fusion)


def test_fused_op_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the custom op and its backward (aot_eager: no compiler needed)."""
    pooled, offsets, weight, bias, fusion = concat_inputs(seed=7)
    pooled = pooled.detach()  # frozen encoders: no pooled gradient

    def step(pooled, weight, bias, *fz):
        out, mix = torch.ops.merv_fast.project_fuse(pooled, pooled.mean(1), offsets, weight, bias, *fz)
        return (out.square().sum() + mix[:, 0].sum())

    params = [weight, bias] + fusion_tensors(fusion)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with use_backend("torch"):
        ours = torch.autograd.grad(compiled(pooled, *params), params)
        eager = torch.autograd.grad(step(pooled, *params), params)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)


def test_fused_op_saves_only_pooled_and_means():
    pooled, offsets, weight, bias, fusion = concat_inputs(length=32, seed=8)
    params = [weight, bias] + fusion_tensors(fusion)
    param_ptrs = {p.data_ptr() for p in params}
    saved = []

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved.append(t.numel() * t.element_size())
        return t

    with use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = torch.ops.merv_fast.project_fuse(pooled, pooled.mean(1), offsets, *params)
    assert sum(saved) <= 1.25 * pooled.numel() * pooled.element_size(), saved
