"""Every architecture specifier and fusion the release can run, against the release's computation
(merv_fast/model/release_visual.py): values and gradients at tiny widths, fp32 and bf16, release checkpoint names,
refusals with their reason. The fused Triton path of the same variants: tests/kernels/triton/
test_visual_fusions_triton.py."""

import sys
from pathlib import Path

import pytest
import torch

from merv_fast.arch import ArchError, check_fusion, parse_arch
from merv_fast.config import ConfigError, apply_overrides, get_preset
from merv_fast.kernels import use_backend
from merv_fast.model.release_visual import release_visual
from merv_fast.model.visual import VisualPath

sys.path.insert(0, str(Path(__file__).parent))
from visual_cases import features as _features, visual_case as _visual  # noqa: E402

FUSIONS = ["cross_attention_avg_lq", "concat_channel", "concat_channel_ln", "concat", "first"]
# Every fusion on the default specifier, and every pooling, frameN and projector under at least one fusion.
CASES = [("no-align+3davg+linear", f) for f in FUSIONS] + [
    ("3davg+frame2+gelu-mlp", "cross_attention_avg_lq"), ("3davg+frame2+gelu-mlp", "concat_channel"),
    ("no-align+avg+fused-gelu-mlp", "concat_channel_ln"), ("attntv+linear", "cross_attention_avg_lq"),
    ("attntv+gelu-mlp", "concat"), ("conv+linear", "cross_attention_avg_lq"),
    ("no-align+3dconv+frame2+none", "cross_attention_avg_lq"), ("3dconv+gelu-mlp", "concat_channel"),
    ("no-align+3dconv+none", "first")]


@pytest.mark.parametrize("arch,fusion", CASES)
def test_matches_the_release_values_and_gradients(arch, fusion):
    cfg, visual = _visual(arch, fusion)
    feats = _features(cfg)
    ours, mix = visual.forward_with_mix([f.clone().requires_grad_() for f in feats])
    ref, ref_mix = release_visual(visual, cfg, feats)
    assert ours.shape == ref.shape == (2, cfg.num_visual_tokens, cfg.llm.hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if ref_mix is not None and len(cfg.encoders) > 1:
        torch.testing.assert_close(mix, ref_mix, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    params = [p for p in visual.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad((ours * g).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    names = [n for n, p in visual.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours_grads, ref_grads):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        # the fusion's key bias gets exactly zero gradient in exact arithmetic: compared absolutely
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("fusion", ["cross_attention_avg_lq", "concat_channel", "concat"])
def test_bf16_within_rounding_of_the_fp32_release(fusion):
    cfg, visual = _visual("no-align+3davg+gelu-mlp", fusion)
    feats = _features(cfg)
    ref, _ = release_visual(visual, cfg, feats)
    ours = visual.to(torch.bfloat16)([f.bfloat16() for f in feats]).float()
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 0.03 * scale


def test_single_encoder_presets_and_no_pooling():
    for name in ("languagebind-single-tiny", "dinov2-single-tiny", "vivit-single-tiny", "siglip-single-tiny"):
        cfg, visual = _visual("no-align+linear", "cross_attention_avg_lq", preset=name)
        enc = cfg.encoders[0]
        assert cfg.num_visual_tokens == enc.time_steps * enc.tokens_per_step  # every token projected
        feats = _features(cfg)
        torch.testing.assert_close(visual(feats), release_visual(visual, cfg, feats)[0])
        # the release builds the cross-attention for one encoder too: held (frozen) so its checkpoints load
        assert visual.fusion is not None and not visual.fusion.query.requires_grad


def test_release_checkpoint_names_round_trip():
    import merv_fast
    from merv_fast.model.release import release_names

    for arch, fusion, expect in [
        ("3davg+gelu-mlp", "concat_channel_ln", {"projectors.0.projector.projector.0.weight",
                                                 "projectors.3.projector.projector.2.bias", "feature_fusion.0.weight",
                                                 "feature_fusion.1.projector.weight"}),
        ("attntv+linear", "concat_channel", {"projectors.1.query_tokens", "projectors.1.cross_attn.xattn.kv.weight",
                                             "projectors.1.projector.projector.weight",
                                             "feature_fusion.projector.bias"}),
        ("3dconv+fused-gelu-mlp", "first", {"projectors.2.convolution_pooling.0.weight",
                                            "projectors.2.projector.projector.4.weight"}),
    ]:
        src = merv_fast.build_model("merv-base-tiny", **{"visual.arch": arch, "visual.fusion": fusion})
        names = set(release_names(src).values())
        assert expect <= names, expect - names
        assert not any(n.startswith("feature_fusion") for n in names) or fusion != "first"
        dst = merv_fast.build_model("merv-base-tiny", **{"visual.arch": arch, "visual.fusion": fusion})
        dst.load_release_state_dict(src.release_state_dict())
        for (n, a), b in zip(src.visual.state_dict().items(), dst.visual.state_dict().values()):
            assert torch.equal(a, b), n
    single = merv_fast.build_model("languagebind-single-tiny", **{"visual.arch": "no-align+linear"})
    assert "projectors.0.projector.weight" in set(release_names(single).values())  # no pooler: wrapped once


def test_refusals_name_the_reason():
    with pytest.raises(ArchError, match=r"merv.py:599-612"):
        check_fusion("query_mlp")
    with pytest.raises(ConfigError, match=r"ScalarAdapter"):
        apply_overrides(get_preset("merv-base-tiny"), {"visual.fusion": "scalar"})
    with pytest.raises(ConfigError, match=r"frameN applies to 3davg and 3dconv"):
        apply_overrides(get_preset("merv-base-tiny"), {"visual.arch": "avg+frame2+linear"})
    with pytest.raises(ConfigError, match=r"one encoder only"):
        apply_overrides(get_preset("merv-base-tiny"), {"visual.arch": "no-align+linear"})
    with pytest.raises(ConfigError, match=r"must be 64 wide"):
        apply_overrides(get_preset("merv-base-tiny"), {"visual.arch": "3davg+none"})
    with pytest.raises(ConfigError, match=r"unknown part"):
        apply_overrides(get_preset("merv-base-tiny"), {"visual.arch": "3davg+pool+linear"})
    spec = parse_arch("no-align+3davg+frame4+gelu-mlp")
    assert (spec.needs_align_stage, spec.pooling, spec.frame_factor, spec.projector) == (False, "3davg", 4, "gelu-mlp")


def test_token_counts_follow_the_release():
    full = get_preset("merv-base")
    assert full.num_visual_tokens == 1024
    assert apply_overrides(full, {"visual.arch": "3davg+frame2+linear"}).num_visual_tokens == 512
    assert apply_overrides(full, {"visual.arch": "avg+linear"}).num_visual_tokens == 16 * 64
    assert apply_overrides(full, {"visual.fusion": "concat"}).num_visual_tokens == 4 * 1024


def test_feature_cache_refuses_learned_pooling():
    import merv_fast
    from merv_fast.runtime.feature_cache import FeatureCacheError, fingerprint

    model = merv_fast.build_model("merv-base-tiny", **{"visual.arch": "attntv+linear"})
    with pytest.raises(FeatureCacheError, match="fixed pooling"):
        fingerprint(model, None, "fp32")


def test_torch_backend_is_the_reference_path():
    cfg, visual = _visual("no-align+3davg+linear", "concat_channel")
    feats = _features(cfg)
    with use_backend("torch"):
        torch.testing.assert_close(visual(feats), release_visual(visual, cfg, feats)[0], rtol=1e-5, atol=1e-5)


def test_info_flops_follow_the_variant():
    from merv_fast.model.flops import llm_train_flops, sample_flops, visual_path_flops

    base = get_preset("merv-base")
    d, L, n = base.llm.hidden_size, 1024, 4

    def with_(**kw):
        return apply_overrides(base, {f"visual.{k}": v for k, v in kw.items()})

    first = visual_path_flops(with_(fusion="first"))
    assert visual_path_flops(with_(fusion="concat_channel")) - first == 3 * 2 * L * n * d * d  # the fusion Linear
    assert visual_path_flops(with_(arch="3davg+gelu-mlp", fusion="first")) - first == 3 * n * 2 * L * d * d
    concat = sample_flops(with_(fusion="concat"), 128)
    assert concat.llm == llm_train_flops(base.llm, 128 + n * L)  # four times the visual tokens reach the LLM
    half = sample_flops(with_(arch="no-align+3davg+frame2+linear"), 128)
    assert half.llm == llm_train_flops(base.llm, 128 + L // 2)
