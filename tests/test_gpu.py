"""Correctness checks that need CUDA (marked `gpu`: skipped on CPU, run by `merv-fast gpu-suite`)."""

import pytest
import torch

import merv_fast
from merv_fast.config import get_preset
from merv_fast.kernels.project_fuse import ReleaseFusion, project_fuse
from merv_fast.model.encoders import build_encoder
from merv_fast.model.visual import VisualPath

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_visual_path_bf16_on_gpu_matches_fp64_reference():
    cfg = get_preset("merv-7b")
    torch.manual_seed(0)
    ref = VisualPath(cfg, cfg.llm.hidden_size).double()
    gpu = VisualPath(cfg, cfg.llm.hidden_size).cuda().bfloat16()
    gpu.load_state_dict(ref.state_dict())
    feats = [torch.randn(2, e.time_steps, e.tokens_per_step, e.hidden_size, dtype=torch.float64) for e in cfg.encoders]
    want = ref(feats)
    got = gpu([f.cuda().bfloat16() for f in feats])
    assert got.shape == (2, 1024, 4096) and rel_err(got.cpu(), want) < 2e-2


def test_release_modules_agree_on_gpu():
    cfg = get_preset("merv-7b")
    torch.manual_seed(1)
    visual = VisualPath(cfg, cfg.llm.hidden_size).cuda()
    pooled = [torch.randn(2, 1024, e.hidden_size, device="cuda") for e in cfg.encoders]
    w, b = [p.weight for p in visual.projectors], [p.bias for p in visual.projectors]
    release = ReleaseFusion(w, b, visual.fusion.weights(), visual.fusion.attention.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, _ = project_fuse(pooled, w, b, visual.fusion.weights())
    assert rel_err(ours, release(pooled)) < 1e-5


@pytest.mark.parametrize("name", ["languagebind", "dinov2", "vivit", "siglip"])
def test_full_size_encoder_bf16_tracks_fp32(name):
    enc_cfg = get_preset("merv-7b").encoder(name)
    torch.manual_seed(2)
    with torch.device("cuda"):
        fp32 = build_encoder(enc_cfg).eval()
        bf16 = build_encoder(enc_cfg).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.bfloat16()
    x = torch.randn(1, enc_cfg.frames, 3, enc_cfg.image_size, enc_cfg.image_size, device="cuda")
    with torch.no_grad():
        want, got = fp32(x), bf16(x.bfloat16())
    h, w = enc_cfg.grid
    assert got.shape == (1, enc_cfg.time_steps, h * w, enc_cfg.hidden_size)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
    assert cos > 0.99, (name, cos.item())


def test_tiny_step_on_gpu_matches_cpu():
    from merv_fast.data.preprocess import preprocess_all
    from merv_fast.data.synthetic import synthetic_batches

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(3)
    cpu = merv_fast.build_model("tiny")
    gpu = merv_fast.build_model("tiny", device="cuda", encoder_dtype=torch.float32)
    gpu.load_state_dict(cpu.state_dict())
    b = synthetic_batches(cpu.config, 2, 24, count=1, seed=4)[0]
    losses = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        bb = b.to(device)
        pixels = preprocess_all(bb.frames, model.config.encoders, model.config.frames_sampled, bb.flip)
        out = model(bb.input_ids, bb.attention_mask, bb.labels, pixels=pixels)
        out.loss.backward()
        losses.append((out.loss.item(), model.visual.projectors[0].weight.grad.cpu()))
    assert abs(losses[0][0] - losses[1][0]) < 1e-4
    assert rel_err(losses[1][1], losses[0][1]) < 1e-3
