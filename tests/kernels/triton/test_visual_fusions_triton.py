"""The visual path's fused Triton kernels (interpreter on CPU, or CUDA) for the variants that run the fused product,
against the release's computation (merv_fast/model/release_visual.py): cross_attention_avg_lq on an MLP projector's last
Linear, concat_channel composed into one product, and the sequence concat / first fusions on the pooling kernel."""

import sys
from pathlib import Path

import pytest
import torch

from merv_fast.kernels import use_backend
from merv_fast.model.release_visual import release_visual

sys.path.insert(0, str(Path(__file__).parents[2] / "model"))
from visual_cases import features, visual_case  # noqa: E402


@pytest.mark.parametrize("arch,fusion", [("no-align+3davg+gelu-mlp", "cross_attention_avg_lq"),
                                         ("3davg+linear", "concat_channel"),
                                         ("no-align+avg+linear", "concat"),
                                         ("3davg+frame2+linear", "first")])
def test_fused_path_equals_the_release(arch, fusion, device):
    cfg, visual = visual_case(arch, fusion)
    visual = visual.to(device)
    feats = [f.to(device) for f in features(cfg)]
    ref, _ = release_visual(visual, cfg, feats)
    params = [p for p in visual.parameters() if p.requires_grad]
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    with use_backend("triton"):
        ours = visual(feats)
        grads = torch.autograd.grad((ours * g).sum(), params, allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
