import pytest

from merv_fast.config import PRESETS, ConfigError, get_preset, load_config, parse_cli_overrides


def test_full_presets_follow_the_spec():
    cfg = get_preset("merv-7b")
    assert [e.name for e in cfg.encoders] == ["languagebind", "dinov2", "vivit", "siglip"]
    assert cfg.num_visual_tokens == 1024 and cfg.visual.pool_size == (16, 8, 8)
    assert [e.grid for e in cfg.encoders] == [(16, 16), (16, 16), (14, 14), (14, 14)]
    assert [e.time_steps for e in cfg.encoders] == [16, 16, 16, 16]
    assert [e.layers_run for e in cfg.encoders] == [23, 23, 12, 11]
    assert cfg.llm.padded_vocab_size == 32064
    one = get_preset("merv-1b").llm
    assert (one.hidden_size, one.num_layers, one.num_heads, one.num_kv_heads, one.intermediate_size) == \
        (2048, 22, 32, 4, 5632)
    assert [e.name for e in get_preset("single-7b").encoders] == ["languagebind"]


def test_tiny_keeps_the_structure():
    cfg = get_preset("tiny")
    assert len({e.hidden_size for e in cfg.encoders}) == 4
    grids = {e.name: e.grid for e in cfg.encoders}
    assert grids["languagebind"] == grids["dinov2"] == (16, 16) and grids["vivit"] == grids["siglip"] == (14, 14)
    assert cfg.encoder("vivit").tubelet == 2 and cfg.encoder("languagebind").frames // cfg.encoder(
        "languagebind").clip_frames == 2
    assert cfg.visual.pool_size[1:] == (8, 8)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: merv-1b\nllm:\n  num_layers: 3\nencoders:\n  dinov2:\n    weights: /w/dino\n")
    cfg = load_config("tiny", path, parse_cli_overrides(["llm.num_layers=5", "visual.pool_size=[8,8,8]"]))
    assert cfg.name == "merv-1b" and cfg.llm.num_layers == 5 and cfg.visual.pool_size == (8, 8, 8)
    assert cfg.encoder("dinov2").weights == "/w/dino"
    assert load_config("tiny", overrides={"encoders": ["siglip", "dinov2"]}).encoders[0].name == "siglip"


@pytest.mark.parametrize("bad, match", [
    ({"llm.nonsense": 1}, "nonsense"),
    ({"encoders.clip.weights": "/x"}, "clip"),
    ({"encoders": ["dinov2", "resnet"]}, "resnet"),
    ({"llm.prompt_format": "alpaca"}, "alpaca"),
    ({"encoders.dinov2.layers_run": 99}, "layers_run"),
])
def test_bad_overrides_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides=bad)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="merv-13b"):
        get_preset("merv-13b")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("tiny", tmp_path / "nope.yaml")
    assert set(PRESETS) >= {"merv-7b", "single-7b", "merv-1b", "single-1b", "tiny", "single-tiny"}


@pytest.mark.parametrize("command", [["cache-features", "--data", "unused.json", "--out", "unused"],
                                     ["train", "--data", "unused.json", "--out", "unused", "--model-config"]])
def test_malformed_yaml_is_one_line_naming_file_line_and_column(tmp_path, capsys, command):
    from merv_fast.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nllm:\n  num_layers: [3\n  hidden_size: 64\n")
    argv = command + [str(path)] if command[-1] == "--model-config" else command + ["--config", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "line 4, column" in err and "not valid YAML" in err
# ----------------------------------------------------------------------------------------------- the release's family
def test_every_release_model_id_at_every_size():
    from merv_fast.config import RELEASE_MODELS, SIZES

    for model_id, (names, arch) in RELEASE_MODELS.items():
        for size in SIZES:
            cfg = get_preset(model_id + size)
            assert cfg.name == model_id + size and [e.name for e in cfg.encoders] == list(names)
            assert (cfg.visual.arch, cfg.visual.fusion, cfg.visual.image_resize_strategy) == (
                arch, "cross_attention_avg_lq", "resize-naive")
    base, alias = get_preset("merv-base"), get_preset("merv-7b")
    assert alias.name == "merv-7b" and alias.to_dict() | {"name": "merv-base"} == base.to_dict()
    assert get_preset("merv-full").visual.arch == "3davg+linear"  # merv-full needs its align stage (no no-align)
    assert [e.backbone_id for e in base.encoders] == ["languagebind-video-noclass", "dinov2-video-all-tokens",
                                                      "vivit-google-b-all-no-cls-16frames",
                                                      "siglip-vit-b16-224px-all-no-cls"]


def test_single_encoders_sample_their_own_frame_count_over_the_clip():
    """The release loads max(num_frames) frames by linspace over the clip (merv.py:800-805): a 16-frame encoder alone
    sees 16 frames spread over the whole clip, its last frame included, not every second of 32."""
    from merv_fast.data.frames import encoder_indices, sample_frame_indices

    assert get_preset("merv-base").frames_sampled == 32
    for name, frames in [("languagebind-single", 16), ("dinov2-single", 16), ("vivit-single", 32),
                         ("siglip-single", 16)]:
        cfg = get_preset(name)
        assert cfg.frames_sampled == frames
        picked = encoder_indices(sample_frame_indices(300, 30.0, cfg.frames_sampled), cfg.encoders[0].frames)
        assert picked == [int(i) for i in __import__("numpy").linspace(0, 299, frames)]
        assert picked[-1] == 299
    # an override of the encoders follows the same rule; an explicit value stays
    assert load_config("merv-base", overrides={"encoders": ["dinov2"]}).frames_sampled == 16
    explicit = {"encoders": ["dinov2"], "visual.frames_sampled": 32}
    assert load_config("merv-base", overrides=explicit).frames_sampled == 32


def test_siglip_variants_from_the_release_ids():
    cfg = load_config("merv-base", overrides={"encoders": ["languagebind", "dinov2", "vivit", "siglip-vit-so400m"]})
    so400m = cfg.encoder("siglip")
    assert (so400m.hidden_size, so400m.num_layers, so400m.layers_run, so400m.patch_size, so400m.intermediate_size) \
        == (1152, 27, 27, 14, 4304)
    assert so400m.output == "pooled" and so400m.grid == (1, 1) and so400m.patch_grid == (16, 16)
    b384 = load_config("siglip-single", overrides={"encoders": ["siglip-vit-b16-384px"]}).encoders[0]
    assert (b384.image_size, b384.checkpoint_image_size, b384.output) == (224, 384, "pooled")
    with pytest.raises(ConfigError, match="siglip-vit-so400m-all-tokens"):
        load_config("merv-base", overrides={"encoders": ["siglip-vit-so400m-all-tokens"]})
