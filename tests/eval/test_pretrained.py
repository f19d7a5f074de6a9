"""Loading a trained MERV as people do: a release run directory (written by export=release) loads back into an
identical model, through our recorded config or through the release table with its parts found offline (a local
hub cache, a weights root); unsupported release models are refused by id and field; weights never load loosely."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import merv_fast
from merv_fast.cli import main
from merv_fast.config import ConfigError, apply_overrides, get_preset
from merv_fast.model.merv import build_model
from merv_fast.model.release_models import COMPONENTS, release_row, row_for_preset, section_of
from merv_fast.pretrained.sources import MissingWeightsError
from merv_fast.pretrained.weights import eval_tokenizer
from merv_fast.train.checkpoint import Checkpointer, export_release_run, export_safetensors


def trained(preset: str = "tiny", seed: int = 0):
    """A model as training leaves it: encoders at the seed's random init, the rest moved off it."""
    torch.manual_seed(seed)
    model = build_model(preset).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoders."):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k].to(sa[k].device))]
    assert not different, different[:5]


def write_parts(model, cache, roots=None):
    """The model's encoders and tokenizer laid out as a Hugging Face hub cache (and encoders also under a weights
    root by release id, when `roots` is given), as the release's parts would be on a user's machine."""
    from safetensors.torch import save_file

    row = row_for_preset(model.config)
    parts = dict(zip(row.video_backbone_ids, (model.encoders[e.name] for e in model.config.encoders)))
    parts[row.llm_backbone_id] = eval_tokenizer(model.config)
    for part_id, part in parts.items():
        base = cache / ("models--" + COMPONENTS[part_id].repo.replace("/", "--"))
        snapshot = base / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text("0123abcd")
        if isinstance(part, torch.nn.Module):
            weights = {k: v.contiguous() for k, v in part.state_dict().items()}
            save_file(weights, str(snapshot / "model.safetensors"))
            if roots is not None:
                (roots / part_id).mkdir(parents=True)
                save_file(weights, str(roots / part_id / "model.safetensors"))
        else:
            part.save_pretrained(str(snapshot))


def test_export_release_loads_back_into_an_identical_model(tmp_path, eval_sets, capsys):
    model = trained()
    run = export_release_run(model, tmp_path / "release", seed=0)
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == section_of(release_row(config["model"]), model.config)
    assert config["model"]["model_id"] == "merv-fast-tiny" and config["merv_fast"]["preset"] == "tiny"
    lm = merv_fast.load_pretrained(run, device="cpu")
    assert lm.source.kind == "release checkpoint" and lm.source.trained_as == "tiny"
    assert_same_weights(model, lm.model)
    from pathlib import Path

    from merv_fast.eval.videolm import VideoLM

    video = sorted((Path(eval_sets["openended"]) / "videos").iterdir())[0]
    question = ["What happens in this video?", "Why?"]
    expected = VideoLM(model, eval_tokenizer(model.config)).generate(video, question, max_new_tokens=5)
    assert lm.generate(video, question, max_new_tokens=5) == expected
    assert main(["ask", "--weights", str(run), "--video", str(video), *question, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "\n".join(f"== {video}: {q}\n{a}\n" for q, a in zip(question, expected))


def test_release_table_and_parts_found_offline(tmp_path):
    model = trained()
    run = export_release_run(model, tmp_path / "run", seed=0)
    config = json.loads((run / "config.json").read_text())
    del config["merv_fast"]  # as the release writes it: only its ModelConfig
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(MissingWeightsError) as info:
        merv_fast.load_pretrained(run, device="cpu", hub_cache=tmp_path / "empty-cache")
    message = str(info.value)
    assert "'tiny-languagebind'" in message and "model.safetensors" in message
    assert str(tmp_path / "empty-cache" / "models--merv-fast--tiny-languagebind") in message
    write_parts(model, tmp_path / "cache", roots=tmp_path / "roots")
    lm = merv_fast.load_pretrained(run, device="cpu", hub_cache=tmp_path / "cache")
    assert_same_weights(model, lm.model)  # encoders from the cache's files, the rest from the checkpoint
    assert lm.model.config.encoder("dinov2").weights.endswith("snapshots/0123abcd")
    reference = eval_tokenizer(model.config)
    assert lm.tokenizer("What is happening?").input_ids == reference("What is happening?").input_ids
    shutil.rmtree(tmp_path / "cache" / "models--merv-fast--tiny-dinov2")
    lm = merv_fast.load_pretrained(run, device="cpu", hub_cache=tmp_path / "cache", weights_roots=[tmp_path / "roots"])
    assert lm.model.config.encoder("dinov2").weights == str(tmp_path / "roots" / "tiny-dinov2")
    assert_same_weights(model, lm.model)


@pytest.mark.parametrize("change,preset,overrides", [
    ({"model_id": "merv-full", "arch_specifier": "3davg+linear"}, "merv-full", {"visual.arch": "3davg+linear"}),
    ({"model_id": "dinov2-single", "video_backbone_ids": ["dinov2-video-all-tokens"], "num_frames": [16]},
     "dinov2-single", {"encoders": ["dinov2-video-all-tokens"]}),
    ({"llm_backbone_id": "vicuna-v15-7b"}, "merv-base", {"llm": "vicuna-v15-7b"}),
    ({"feature_fusion": "concat_channel"}, "merv-base", {"visual.fusion": "concat_channel"}),
    ({"model_id": "my-own-run", "video_backbone_ids": ["languagebind-video-noclass", "siglip-vit-so400m"],
      "num_frames": [16, 16]}, "merv-base", {"encoders": ["languagebind-video-noclass", "siglip-vit-so400m"]}),
])
def test_every_release_model_the_fields_describe_is_built(change, preset, overrides):
    """The release builds a model from the section's fields (its model id is a name): so do we, from the id's preset
    with the fields as overrides, and the result writes back the same section."""
    section = {**section_of(row_for_preset(get_preset("merv-base"))), **change}
    row = release_row(section, "RUN/config.json")
    assert row.preset == preset and overrides.items() <= row.overrides.items()
    cfg = apply_overrides(get_preset(row.preset), row.overrides)
    assert section_of(row, cfg) == {**section_of(row_for_preset(get_preset("merv-base"))), **change}


@pytest.mark.parametrize("change,field", [
    ({"feature_fusion": "query_mlp"}, "feature_fusion"),  # the release builds it, but cannot run it
    ({"image_resize_strategy": "letterbox"}, "image_resize_strategy"),  # LanguageBind asserts resize-naive
    ({"video_backbone_ids": ["hiera-base-16x224"] * 4}, "video_backbone_ids"),
    ({"llm_backbone_id": "mistral-7b"}, "llm_backbone_id"),
    ({"num_frames": [8, 16, 32, 16]}, "num_frames"),
    ({"visual_feature_length": 2048}, "visual_feature_length"),
])
def test_release_models_we_cannot_build_are_refused(change, field):
    section = {**section_of(row_for_preset(get_preset("merv-base"))), **change}
    with pytest.raises(ConfigError) as info:
        release_row(section, "RUN/config.json")
    assert repr(section["model_id"]) in str(info.value) and repr(field) in str(info.value)
    assert str(info.value).startswith("RUN/config.json")


def test_release_sections_as_load_vid_reads_them():
    base = section_of(row_for_preset(get_preset("merv-7b")))
    assert base["model_id"] == "merv-base" and release_row(base).preset == "merv-base"
    assert release_row({"model_id": "merv-base"}).preset == "merv-base"  # MERV_Base fills in the rest
    assert release_row({**base, "model_id": "my-own-run"}).preset == "merv-base"  # another id, the same model
    single = {**section_of(row_for_preset(get_preset("single-7b"))), "num_frames": 16}  # an int, as older configs
    assert release_row(single).preset == "languagebind-single"


def test_one_encoder_release_checkpoints_load_with_their_fusion(tmp_path):
    """The release builds its fusion for one encoder too (softmax weight exactly 1): a single-encoder model holds
    those parameters, so a single-encoder release checkpoint loads whole; any stray key still fails."""
    from merv_fast.pretrained.weights import load_weights

    single = trained("single-tiny")
    state = single.release_state_dict()
    assert any(k.startswith("feature_fusion.") for k in state)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": section_of(row_for_preset(single.config))}))
    torch.save({"model": state}, run / "checkpoints" / "latest-checkpoint.pt")
    fresh = build_model("single-tiny")
    load_weights(fresh, run)
    for name, p in single.named_parameters():
        if not name.startswith("encoders."):
            assert torch.equal(p, fresh.state_dict()[name]), name
    torch.save({"model": {**state, "vision_backbone.x": torch.zeros(1)}}, run / "checkpoints" / "latest-checkpoint.pt")
    with pytest.raises(ValueError, match="vision_backbone.x"):
        load_weights(build_model("single-tiny"), run)


def tiny_runs(tmp_path) -> dict:
    """A tiny model's weights as each of our writers leaves them."""
    model = trained()
    from merv_fast.train.parallel import TrainModule

    module = TrainModule(model)
    state = SimpleNamespace(model=module, optimizer=torch.optim.AdamW(module.parameters()), step=3,
                            scheduler=None, sampler=None, config={"seed": 0})
    Checkpointer(tmp_path / "train").save(state)
    return {"training run": tmp_path / "train",
            "safetensors": export_safetensors(model, tmp_path / "export" / "model.safetensors", seed=0),
            "release run": export_release_run(model, tmp_path / "release", seed=0)}


def test_weights_never_load_loosely(tmp_path, eval_sets, capsys):
    """`eval --preset single-tiny --weights <a tiny run>` fails naming the keys and the preset the file was trained
    as, for every kind of file; without --preset the weights' own model is evaluated, and run.json says what was
    read."""
    for kind, weights in tiny_runs(tmp_path).items():
        argv = ["eval", "--task", "mc", "--data", str(eval_sets["mcq"]), "--weights", str(weights)]
        assert main(argv + ["--out", str(tmp_path / f"wrong-{kind}"), "--preset", "single-tiny"]) == 2, kind
        err = capsys.readouterr().err
        assert "does not fit model 'single-tiny'" in err and "unexpected key(s)" in err, (kind, err)
        assert "projectors.1." in err and "trained as preset 'tiny'" in err, (kind, err)
        out = tmp_path / f"right-{kind}"
        assert main(argv + ["--out", str(out), "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
        run = json.loads((out / "run.json").read_text())
        assert run["model"] == "tiny" and run["weights_read"]["trained_as"] == "tiny"
        assert run["weights_read"]["path"].startswith(str(tmp_path.resolve() / weights.relative_to(tmp_path)))
    capsys.readouterr()


def test_model_config_round_trips_through_json():
    from merv_fast.config import model_config_from_dict

    for name in ("tiny", "single-tiny", "merv-7b"):
        cfg = get_preset(name)
        assert model_config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="llm: unknown key"):
        model_config_from_dict({**get_preset("tiny").to_dict(), "llm": {"hidden": 3}}, "x.json")
