"""The four frozen encoders: shapes, LanguageBind's clip-wise temporal attention, built-and-run block counts,
checkpoint layouts (ours, Hugging Face, timm, Meta) and the errors a bad checkpoint raises."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from merv_fast.config import ConfigError, get_preset
from merv_fast.model.encoders import WeightsError, build_encoder
from merv_fast.model.encoders.dinov2 import ATTENTION_SPELLINGS
from merv_fast.model.encoders.vivit import LAYER_SPELLINGS

TINY = {e.name: e for e in get_preset("tiny").encoders}
NAMES = list(TINY)


def pixels(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.frames, 3, cfg.image_size, cfg.image_size, generator=gen)


def build(cfg, seed=0, **changes):
    torch.manual_seed(seed)
    return build_encoder(dataclasses.replace(cfg, **changes)).eval()


def run(encoder, x):
    with torch.no_grad():
        return encoder(x)


def save_dir(tmp_path, state, name="model.safetensors"):
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    return str(tmp_path)


# ----------------------------------------------------------------------------------------------- shapes and structure
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_attributes(name):
    cfg = TINY[name]
    encoder = build(cfg)
    out = run(encoder, pixels(cfg))
    h, w = cfg.grid
    assert encoder.grid == (h, w) and encoder.out_frames == cfg.time_steps and encoder.out_dim == cfg.hidden_size
    assert encoder.config is cfg or encoder.config == cfg
    assert out.shape == (2, cfg.time_steps, h * w, cfg.hidden_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_encoder_takes_float32_pixels(name):
    cfg = TINY[name]
    encoder = build(cfg).to(torch.bfloat16)
    out = run(encoder, pixels(cfg, batch=1))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_vivit_tubelets_and_languagebind_clips_in_tiny_preset():
    vivit, lb = TINY["vivit"], TINY["languagebind"]
    assert vivit.grid == (14, 14) and vivit.tubelet == 2 and vivit.time_steps == vivit.frames // 2
    assert lb.frames // lb.clip_frames == 2  # two clips, as the full-size 16 frames / 8


@pytest.mark.parametrize("name", NAMES)
def test_only_layers_run_blocks_are_built_and_run(name):
    cfg = TINY[name]
    assert cfg.layers_run < cfg.num_layers or name == "vivit"  # the tiny preset skips a block where the release does
    encoder = build(cfg)
    assert len(encoder.blocks) == cfg.layers_run
    block_indices = {int(m.group(1)) for k in encoder.state_dict() if (m := re.search(r"layers?\.(\d+)\.", k))}
    assert block_indices == set(range(cfg.layers_run))
    calls = []
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    run(encoder, pixels(cfg, batch=1))
    assert calls == list(range(cfg.layers_run))
    # the heads and norms after the layer taken are not built either (ViViT's final norm is part of its output)
    keys = set(encoder.state_dict())
    assert not any(k.startswith(("layernorm.", "post_layernorm.", "head.", "vision_model.post_layernorm",
                                 "visual_projection")) for k in keys)


def test_languagebind_parameter_names_follow_the_hf_checkpoint():
    keys = set(build(TINY["languagebind"]).state_dict())
    layer = "vision_model.encoder.layers.0."
    expected = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
                layer + "temporal_embedding", layer + "temporal_layer_norm1.weight", layer + "layer_norm1.bias",
                layer + "layer_norm2.weight", layer + "mlp.fc1.weight", layer + "mlp.fc2.bias"}
    expected |= {f"{layer}{attn}.{p}_proj.{wb}" for attn in ("temporal_attn", "self_attn")
                 for p in ("q", "k", "v", "out") for wb in ("weight", "bias")}
    assert expected <= keys
    assert "vision_model.embeddings.patch_embedding.bias" not in keys  # CLIP's patch conv has no bias


# ----------------------------------------------------------------------------------------------- temporal structure
def frames_changed(encoder, cfg, frame):
    x = pixels(cfg, batch=1)
    y = x.clone()
    y[:, frame] += 1.0
    base, moved = run(encoder, x), run(encoder, y)
    return [t for t in range(base.shape[1]) if not torch.equal(base[:, t], moved[:, t])]


def test_languagebind_temporal_attention_mixes_within_a_clip_only():
    cfg = TINY["languagebind"]
    encoder = build(cfg)
    clip = cfg.clip_frames
    assert frames_changed(encoder, cfg, frame=1) == list(range(clip))  # every frame of clip 0, nothing of clip 1
    assert frames_changed(encoder, cfg, frame=clip + 2) == list(range(clip, 2 * clip))


@pytest.mark.parametrize("name", ["dinov2", "siglip"])
def test_per_frame_encoders_keep_frames_apart(name):
    cfg = TINY[name]
    assert frames_changed(build(cfg), cfg, frame=3) == [3]


def test_vivit_attends_across_all_time_steps():
    cfg = TINY["vivit"]
    assert frames_changed(build(cfg), cfg, frame=0) == list(range(cfg.time_steps))


def test_languagebind_temporal_embedding_is_per_frame_position():
    cfg = TINY["languagebind"]
    encoder = build(cfg)
    x = pixels(cfg, batch=1)[:, :1].expand(-1, cfg.frames, -1, -1, -1)  # a static video
    out = run(encoder, x)
    assert not torch.allclose(out[:, 0], out[:, 1])  # same frame, different positions in the clip
    torch.testing.assert_close(out[:, 0], out[:, cfg.clip_frames])  # same position in two clips


# ----------------------------------------------------------------------------------------------- SDPA and meta builds
@pytest.mark.parametrize("name", NAMES)
def test_attention_runs_through_sdpa(name):
    cfg = TINY[name]
    encoder = build(cfg)
    for module in encoder.modules():
        hf_config = getattr(module, "config", None)
        if hf_config is not None and hasattr(hf_config, "_attn_implementation"):
            assert hf_config._attn_implementation == "sdpa"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(encoder, pixels(cfg, batch=1))
    sdpa_calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    per_block = 2 if name == "languagebind" else 1  # temporal + spatial
    assert sdpa_calls == per_block * cfg.layers_run


def test_full_size_encoders_build_on_meta(tmp_path):
    for cfg in get_preset("merv-7b").encoders:
        with torch.device("meta"):
            encoder = build_encoder(dataclasses.replace(cfg, weights=str(tmp_path)))  # path exists: not read on meta
        assert all(p.is_meta for p in encoder.parameters()) and all(b.is_meta for b in encoder.buffers())
        assert len(encoder.blocks) == cfg.layers_run
        assert encoder.grid == cfg.grid and encoder.out_frames == cfg.time_steps
    with torch.device("meta"), pytest.raises(WeightsError, match="nowhere"):
        build_encoder(dataclasses.replace(cfg, weights=str(tmp_path / "nowhere")))


def test_unknown_encoder_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="dinov2.*languagebind.*siglip.*vivit"):
        build_encoder(dataclasses.replace(TINY["dinov2"], name="clip"))


# ----------------------------------------------------------------------------------------------- our own checkpoints
@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_through_hf_layout(name, tmp_path):
    cfg = TINY[name]
    source = build(cfg, seed=1)
    target = build(cfg, seed=2, weights=save_dir(tmp_path, source.state_dict()))
    x = pixels(cfg)
    assert torch.equal(run(source, x), run(target, x))


@pytest.mark.parametrize("name", ["languagebind", "dinov2", "siglip"])
def test_blocks_after_the_layer_taken_are_dropped_silently(name, tmp_path):
    """A full-depth checkpoint loads into the truncated encoder and gives block layers_run's raw output."""
    cfg = TINY[name]
    full = build(cfg, seed=3, layers_run=cfg.num_layers)
    taken = []
    full.blocks[cfg.layers_run - 1].register_forward_hook(lambda m, i, out: taken.append(out))
    x = pixels(cfg)
    run(full, x)
    truncated = build(cfg, weights=save_dir(tmp_path, full.state_dict()))
    prefix = {"languagebind": 1, "dinov2": 1 + cfg.registers, "siglip": 0}[name]
    expected = taken[0][:, prefix:].unflatten(0, x.shape[:2])
    torch.testing.assert_close(run(truncated, x), expected, rtol=0, atol=0)


def test_sharded_index_and_torch_pickle_formats(tmp_path):
    cfg = TINY["siglip"]
    source = build(cfg, seed=4)
    state = source.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k].contiguous() for k in keys[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k].contiguous() for k in keys[half:]}, str(tmp_path / "b.safetensors"))
    weight_map = {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"state_dict": state}, tmp_path / "weights.pt")
    x = pixels(cfg)
    for weights in (str(tmp_path), str(tmp_path / "weights.pt")):
        torch.testing.assert_close(run(build(cfg, weights=weights), x), run(source, x), rtol=0, atol=0)


def test_languagebind_full_checkpoint_with_text_tower_and_heads(tmp_path):
    cfg = TINY["languagebind"]
    source = build(cfg, seed=5)
    state = dict(source.state_dict())
    state.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.ones(()),
                  "visual_projection.weight": torch.randn(8, cfg.hidden_size),
                  "vision_model.post_layernorm.weight": torch.ones(cfg.hidden_size),
                  "vision_model.embeddings.position_ids": torch.arange(257)[None]})
    x = pixels(cfg)
    assert torch.equal(run(build(cfg, weights=save_dir(tmp_path, state)), x), run(source, x))


def older_spelling(state, pairs):
    for older, newer in reversed(pairs):
        state = {k.replace(newer, older): v for k, v in state.items()}
    return state


def test_vivit_classification_checkpoint_with_vit_style_names(tmp_path):
    cfg = TINY["vivit"]
    source = build(cfg, seed=6)
    state = {k.removeprefix("vivit."): v for k, v in source.state_dict().items()}
    state = {"vivit." + k: v for k, v in older_spelling(state, LAYER_SPELLINGS).items()}
    assert any("encoder.layer.0.intermediate.dense" in k for k in state)  # really the old spelling
    state["classifier.weight"] = torch.randn(400, cfg.hidden_size)
    x = pixels(cfg)
    assert torch.equal(run(build(cfg, weights=save_dir(tmp_path, state)), x), run(source, x))


def test_dinov2_checkpoint_in_either_attention_spelling(tmp_path):
    cfg = TINY["dinov2"]
    source = build(cfg, seed=7)
    x = pixels(cfg)
    for i, pairs in enumerate((ATTENTION_SPELLINGS, [(new, old) for old, new in ATTENTION_SPELLINGS])):
        state = older_spelling(source.state_dict(), pairs)
        state["embeddings.mask_token"] = torch.zeros(1, cfg.hidden_size)
        state["layernorm.weight"] = torch.ones(cfg.hidden_size)
        folder = tmp_path / str(i)
        folder.mkdir()
        assert torch.equal(run(build(cfg, weights=save_dir(folder, state)), x), run(source, x))


# ----------------------------------------------------------------------------------------------- timm checkpoints
def random_timm_vit(cfg, *, blocks, cls=False, registers=0, layer_scale=False, seed=0):
    """A timm VisionTransformer state dict (no-embed-class position table) with random weights, plus the final
    norm and pooling head the encoders must ignore."""
    gen = torch.Generator().manual_seed(seed)
    c, p, n = cfg.hidden_size, cfg.patch_size, cfg.tokens_per_step

    def rnd(*shape, scale=0.2, base=0.0):
        return base + scale * torch.randn(*shape, generator=gen)

    sd = {"patch_embed.proj.weight": rnd(c, 3, p, p), "patch_embed.proj.bias": rnd(c), "pos_embed": rnd(1, n, c),
          "norm.weight": rnd(c, base=1.0), "norm.bias": rnd(c), "attn_pool.latent": rnd(1, 1, c)}
    if cls:
        sd["cls_token"] = rnd(1, 1, c)
    if registers:
        sd["reg_token"] = rnd(1, registers, c)
    for i in range(blocks):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd.update({b + norm + ".weight": rnd(c, base=1.0), b + norm + ".bias": rnd(c)})
        sd.update({b + "attn.qkv.weight": rnd(3 * c, c), b + "attn.qkv.bias": rnd(3 * c),
                   b + "attn.proj.weight": rnd(c, c), b + "attn.proj.bias": rnd(c),
                   b + "mlp.fc1.weight": rnd(cfg.intermediate_size, c), b + "mlp.fc1.bias": rnd(cfg.intermediate_size),
                   b + "mlp.fc2.weight": rnd(c, cfg.intermediate_size), b + "mlp.fc2.bias": rnd(c)})
        if layer_scale:
            sd.update({b + "ls1.gamma": rnd(c, base=1.0), b + "ls2.gamma": rnd(c, base=1.0)})
    return sd


def timm_reference(sd, frames, cfg, blocks):
    """timm's VisionTransformer forward written out (no-embed-class: add pos_embed to patches, then prepend CLS and
    registers; blocks with fused qkv split as (3, heads, head_dim); exact GELU; layer scale), returning block
    `blocks`'s raw output: what `get_intermediate_layers` hands the release."""
    c, heads = cfg.hidden_size, cfg.num_heads
    x = F.conv2d(frames, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    x = torch.cat([sd[k].expand(len(x), -1, -1) for k in ("cls_token", "reg_token") if k in sd] + [x], dim=1)
    n, length = x.shape[:2]
    for i in range(blocks):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (c,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], cfg.layer_norm_eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        attn = F.linear((weights @ v).transpose(1, 2).reshape(n, length, c), sd[b + "attn.proj.weight"],
                        sd[b + "attn.proj.bias"])
        x = x + attn * sd.get(b + "ls1.gamma", 1.0)
        h = F.layer_norm(x, (c,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], cfg.layer_norm_eps)
        mlp = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                       sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + mlp * sd.get(b + "ls2.gamma", 1.0)
    return x


@pytest.mark.parametrize("name", ["dinov2", "siglip"])
def test_timm_checkpoint_matches_timm_semantics(name, tmp_path):
    cfg = dataclasses.replace(TINY[name], hidden_act="gelu")  # timm's ViTs use exact GELU
    dino = name == "dinov2"
    sd = random_timm_vit(cfg, blocks=cfg.num_layers, cls=dino, registers=cfg.registers, layer_scale=dino, seed=8)
    torch.save(sd, tmp_path / "timm.pth")
    encoder = build(cfg, weights=str(tmp_path / "timm.pth"))
    x = pixels(cfg, batch=1)
    expected = timm_reference(sd, x.flatten(0, 1), cfg, cfg.layers_run)
    prefix = 1 + cfg.registers if dino else 0
    torch.testing.assert_close(run(encoder, x), expected[:, prefix:].unflatten(0, x.shape[:2]), rtol=1e-4, atol=1e-4)


def test_dinov2_positions_resampled_once_the_timm_way(tmp_path):
    cfg = TINY["dinov2"]
    sd = random_timm_vit(cfg, blocks=cfg.layers_run, cls=True, registers=cfg.registers, layer_scale=True, seed=9)
    trained = torch.randn(1, 37 * 37, cfg.hidden_size)  # like the 518 px checkpoint's 37x37 table
    sd["pos_embed"] = trained
    torch.save(sd, tmp_path / "timm.pth")
    loaded = build(cfg, weights=str(tmp_path / "timm.pth")).embeddings.position_embeddings.detach()
    grid = trained.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=cfg.grid, mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(loaded[:, 0], torch.zeros_like(loaded[:, 0]))  # timm's CLS already holds its position
    torch.testing.assert_close(loaded[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, -1, cfg.hidden_size))
    # at the right grid nothing is resampled, so transformers' runtime interpolation has nothing to do either
    sd["pos_embed"] = torch.randn(1, cfg.tokens_per_step, cfg.hidden_size)
    torch.save(sd, tmp_path / "timm.pth")
    loaded = build(cfg, weights=str(tmp_path / "timm.pth")).embeddings.position_embeddings.detach()
    assert torch.equal(loaded[:, 1:], sd["pos_embed"])


def test_dinov2_meta_original_layout(tmp_path):
    """Meta's checkpoints keep a CLS slot in pos_embed and call the registers `register_tokens`."""
    cfg = TINY["dinov2"]
    sd = random_timm_vit(cfg, blocks=cfg.layers_run, cls=True, registers=cfg.registers, layer_scale=True, seed=10)
    timm_encoder = build(cfg, weights=save_dir(tmp_path, sd, "timm.safetensors") + "/timm.safetensors")
    meta = dict(sd)
    cls_position = torch.randn(1, 1, cfg.hidden_size)
    meta["pos_embed"] = torch.cat([cls_position, sd.pop("pos_embed")], dim=1)
    meta["cls_token"] = sd["cls_token"] - cls_position  # so that CLS + its position is timm's CLS
    meta["register_tokens"] = meta.pop("reg_token")
    meta["mask_token"] = torch.zeros(1, cfg.hidden_size)
    meta_encoder = build(cfg, weights=save_dir(tmp_path, meta, "meta.safetensors") + "/meta.safetensors")
    x = pixels(cfg)
    torch.testing.assert_close(run(meta_encoder, x), run(timm_encoder, x))


# ----------------------------------------------------------------------------------------------- errors
def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(WeightsError, match="no_such_checkpoint"):
        build(TINY["siglip"], weights=str(missing))
    with pytest.raises(WeightsError, match="holds none of"):
        build(TINY["siglip"], weights=str(tmp_path))  # a directory without a checkpoint


def test_missing_key_names_file_and_key(tmp_path):
    cfg = TINY["languagebind"]
    state = dict(build(cfg).state_dict())
    del state["vision_model.encoder.layers.1.temporal_attn.k_proj.weight"]
    folder = save_dir(tmp_path, state)
    with pytest.raises(WeightsError) as err:
        build(cfg, weights=folder)
    assert "model.safetensors" in str(err.value) and "layers.1.temporal_attn.k_proj.weight" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    cfg = TINY["vivit"]
    state = dict(build(cfg).state_dict())
    state["vivit.layers.0.mlp.fc1.weight"] = torch.zeros(7, cfg.hidden_size)
    with pytest.raises(WeightsError) as err:
        build(cfg, weights=save_dir(tmp_path, state))
    message = str(err.value)
    assert "model.safetensors" in message and "layers.0.mlp.fc1.weight" in message
    assert f"(7, {cfg.hidden_size})" in message and f"({cfg.intermediate_size}, {cfg.hidden_size})" in message


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    state = build(TINY["siglip"]).state_dict()
    with pytest.raises(WeightsError, match="ViViT"):
        build(TINY["vivit"], weights=save_dir(tmp_path, state))


# ----------------------------------------------------------------------------------------------- SigLIP's other ids
def timm_map_head(sd, x, cfg):
    """timm's forward after the blocks for a SigLIP ViT: final norm, then AttentionPoolLatent (a latent query; q and
    kv projections, kv rows k then v; scaled dot-product over `heads`; out projection; residual MLP on its norm);
    token 0."""
    c, heads = cfg.hidden_size, cfg.num_heads
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], cfg.layer_norm_eps)
    n = len(x)
    q = F.linear(sd["attn_pool.latent"].expand(n, -1, -1), sd["attn_pool.q.weight"], sd["attn_pool.q.bias"])
    k, v = F.linear(x, sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"]).reshape(n, -1, 2, heads, c // heads) \
        .permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q.reshape(n, 1, heads, c // heads).transpose(1, 2), k, v)
    y = F.linear(y.transpose(1, 2).reshape(n, 1, c), sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"])
    h = F.layer_norm(y, (c,), sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"], cfg.layer_norm_eps)
    y = y + F.linear(F.gelu(F.linear(h, sd["attn_pool.mlp.fc1.weight"], sd["attn_pool.mlp.fc1.bias"])),
                     sd["attn_pool.mlp.fc2.weight"], sd["attn_pool.mlp.fc2.bias"])
    return y[:, 0]


def test_siglip_pooled_ids_run_timms_whole_forward(tmp_path):
    """The release's SigLIP ids without -all-no-cls (siglip-vit-b16-384px, siglip-vit-so400m, ...) take timm's
    forward: every block, the final norm and the MAP head, one token per frame (siglip.py:47-79, 142-151)."""
    cfg = dataclasses.replace(TINY["siglip"], hidden_act="gelu", output="pooled", layers_run=TINY["siglip"].num_layers)
    sd = random_timm_vit(cfg, blocks=cfg.num_layers, seed=11)
    gen = torch.Generator().manual_seed(12)
    c, i = cfg.hidden_size, cfg.intermediate_size
    for name, shape in [("q.weight", (c, c)), ("q.bias", (c,)), ("kv.weight", (2 * c, c)), ("kv.bias", (2 * c,)),
                        ("proj.weight", (c, c)), ("proj.bias", (c,)), ("norm.weight", (c,)), ("norm.bias", (c,)),
                        ("mlp.fc1.weight", (i, c)), ("mlp.fc1.bias", (i,)), ("mlp.fc2.weight", (c, i)),
                        ("mlp.fc2.bias", (c,))]:
        sd["attn_pool." + name] = 0.2 * torch.randn(*shape, generator=gen) + (1.0 if name == "norm.weight" else 0.0)
    torch.save(sd, tmp_path / "timm.pth")
    encoder = build(cfg, weights=str(tmp_path / "timm.pth"))
    x = pixels(cfg, batch=1)
    tokens = timm_reference(sd, x.flatten(0, 1), cfg, cfg.num_layers)
    expected = timm_map_head(sd, tokens, cfg).unflatten(0, x.shape[:2])[:, :, None]
    got = run(encoder, x)
    assert got.shape == (1, cfg.frames, 1, c) and cfg.grid == (1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_siglip_positions_of_a_larger_resolution_resampled(tmp_path):
    """A 384-px SigLIP run at 224 px (as the release does): its position table is resampled at load, as timm's
    checkpoint filter does (bicubic, antialias)."""
    cfg = TINY["siglip"]
    state = dict(build(cfg, seed=13).state_dict())
    trained = torch.randn(20 * 20, cfg.hidden_size)
    state["embeddings.position_embedding.weight"] = trained
    loaded = build(cfg, weights=save_dir(tmp_path, state)).embeddings.position_embedding.weight.detach()
    grid = trained.reshape(1, 20, 20, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=cfg.patch_grid, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(loaded, expected.permute(0, 2, 3, 1).reshape(-1, cfg.hidden_size))


# ----------------------------------------------------------------------------------------------- the weights' config
@pytest.mark.parametrize("name,config,field", [
    ("vivit", {"hidden_act": "gelu"}, "hidden_act"),
    ("vivit", {"num_frames": 8}, "num_frames"),
    ("vivit", {"tubelet_size": [1, 8, 8]}, "tubelet_size"),
    ("dinov2", {"layer_norm_eps": 1e-5}, "layer_norm_eps"),
    ("dinov2", {"num_hidden_layers": 12}, "num_hidden_layers"),
    ("languagebind", {"vision_config": {"num_frames": 16}}, "num_frames"),
    ("siglip", {"vision_config": {"patch_size": 16}}, "patch_size"),
])
def test_weights_config_mismatch_names_file_field_and_values(tmp_path, name, config, field):
    cfg = TINY[name]
    folder = save_dir(tmp_path, build(cfg).state_dict())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        build(cfg, weights=folder)
    message = str(err.value)
    wrong = (config.get("vision_config") or config)[field]
    assert "config.json" in message and field in message and repr(wrong) in message, message
    with torch.device("meta"), pytest.raises(WeightsError, match=field):  # a meta build checks it too
        build_encoder(dataclasses.replace(cfg, weights=folder))


def test_weights_config_that_agrees_loads(tmp_path):
    cfg = TINY["siglip"]
    source = build(cfg, seed=14)
    folder = save_dir(tmp_path, source.state_dict())
    # Hugging Face's SigLIP config declares the tanh GELU for the same weights timm runs with exact GELU
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size}}))
    x = pixels(cfg)
    assert torch.equal(run(build(cfg, weights=folder), x), run(source, x))


def test_missing_timm_key_names_the_checkpoint_key_and_ours(tmp_path):
    cfg = TINY["dinov2"]
    sd = random_timm_vit(cfg, blocks=cfg.layers_run, cls=True, registers=cfg.registers, layer_scale=True, seed=15)
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "timm.pth")
    with pytest.raises(WeightsError) as err:
        build(cfg, weights=str(tmp_path / "timm.pth"))
    message = str(err.value)
    assert "timm.pth" in message and "'blocks.1.mlp.fc2.weight'" in message and "encoder.layer.1.mlp.fc2.weight" in \
        message, message
