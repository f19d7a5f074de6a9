"""The pooled-feature cache: bitwise round trip against the live features (both flips), training from it equals live
training, refusal of a cache built for another model or sampling, a corrupt shard and a missing sample named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import merv_fast
from merv_fast.cli import main
from merv_fast.data.dataset import load_entries, load_media
from merv_fast.data.preprocess import preprocess_batch
from merv_fast.runtime.feature_cache import (CachedFeatureDataset, FeatureCache, FeatureCacheError,
                                             build_feature_cache, media_key)

CONV = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Something moves."}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthesized dataset (videos, images, a text entry) plus one broken video entry."""
    from merv_fast.data.synth import synthesize

    root = tmp_path_factory.mktemp("media")
    info = synthesize(root, videos=3, images=2, texts=1, seed=0)
    entries = json.loads(Path(info["json"]).read_text())
    (root / "broken.mp4").write_bytes(b"not a video")
    entries.append({"id": "broken", "video": "broken.mp4", "conversations": CONV})
    path = root / "with_broken.json"
    path.write_text(json.dumps(entries))
    return path


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return merv_fast.build_model("tiny", kernels="torch", **overrides)


@pytest.fixture(scope="module")
def fp32_cache(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    build_feature_cache(tiny_model(), load_entries(data), data.parent, out, storage_dtype="float32", shard_size=2,
                        batch_size=3)
    return out


def live_pooled(model, entry, root, flip):
    frames = torch.as_tensor(load_media(entry, root, frames=model.config.frames_sampled))
    image = entry.kind == "image"
    pixels = preprocess_batch(frames[None], model.config.encoders, model.config.frames_sampled,
                              torch.tensor([flip]), torch.float32, is_image=torch.tensor([image]))
    with torch.no_grad():
        return model.visual.pool(model.encode(pixels, is_image=image))


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_round_trip_equals_live_features_bitwise(data, fp32_cache, tmp_path, storage):
    model = tiny_model()
    if storage == "float32":
        cache_dir = fp32_cache
    else:
        cache_dir = tmp_path / "bf16"
        build_feature_cache(model, load_entries(data), data.parent, cache_dir, shard_size=2, batch_size=3)
    cache = FeatureCache(cache_dir)
    cache.check(model, None)
    names = [e.name for e in model.config.encoders]
    visual = [e for e in load_entries(data) if e.kind != "text" and e.id != "broken"]
    assert sorted(cache.entries) == sorted(media_key(e) for e in visual)
    assert list(cache.failed) == ["video:broken.mp4"] and len(cache.shards) == 3
    for entry in visual:
        for flip in (False, True):
            pooled, means = live_pooled(model, entry, data.parent, flip)
            got = cache.features([media_key(entry)], [flip], names)
            assert got.pooled.dtype == getattr(torch, storage)
            assert torch.equal(got.pooled, pooled.to(got.pooled.dtype)), (entry.id, flip)
            assert torch.equal(got.means, means.to(got.means.dtype)), (entry.id, flip)
    # the flip variant differs only in LanguageBind's columns (the other encoders never flip)
    entry = visual[0]
    a, b = (cache.features([media_key(entry)], [f], names).pooled for f in (False, True))
    width = model.config.encoders[0].hidden_size
    assert not torch.equal(a[..., :width], b[..., :width]) and torch.equal(a[..., width:], b[..., width:])


def test_training_from_the_cache_equals_live_training(data, fp32_cache, tmp_path):
    common = ["train", "--preset", "tiny", "--data", str(data), "--set", "num_workers=0", "--set", "kernels=torch",
              "--set", "activation_checkpointing=off", "--max-steps", "3", "--total-steps", "4"]
    assert main(common + ["--out", str(tmp_path / "live")]) == 0
    assert main(common + ["--out", str(tmp_path / "cached"), "--set", f"feature_cache={fp32_cache}"]) == 0

    def run(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return [r["loss"] for r in rows], summary["bad_samples"]

    live, cached = run("live"), run("cached")
    assert live == cached  # losses bit for bit, and the same broken sample replaced the same way
    assert len(live[0]) == 3


def test_cli_builds_the_cache(data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["cache-features", "--data", str(data), "--out", str(out), "--set", "kernels=torch",
                 "--shard-size", "4"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["fingerprint"]["storage_dtype"] == "bfloat16" and len(index["entries"]) == 5
    captured = capsys.readouterr()
    assert "cached 5 media items in 2 shard(s)" in captured.out
    assert "failed: video:broken.mp4" in captured.err  # the one broken entry, with its reason
    assert "cache-features" in captured.err and "6/6" in captured.err  # progress (tqdm, or a plain line)


def test_cli_exits_1_when_nothing_was_cached(data, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["cache-features", "--data", str(data), "--media-root", str(tmp_path / "wrong"), "--out",
                 str(out), "--set", "kernels=torch"]) == 1
    err = capsys.readouterr().err
    assert "nothing was cached: all 6 media items failed to load" in err
    assert err.count("  failed: ") == 5 and "and 1 more" in err


@pytest.mark.parametrize("overrides, field", [
    ({"visual.frames_sampled": 32}, "frame_sampling.frames_sampled: cache 16, this run 32"),
    ({"encoders.dinov2.layers_run": 1}, "encoders[dinov2].layers_run: cache 2, this run 1"),
    ({"encoders.siglip.preprocess.interpolation": "bilinear"}, "encoders[siglip].preprocess.interpolation"),
    ({"visual.pool_size": [2, 8, 8]}, "pool_size"),
])
def test_cache_for_another_config_is_refused_naming_the_field(fp32_cache, overrides, field):
    with pytest.raises(FeatureCacheError, match="built for another configuration: " + field.replace("[", r"\[")):
        FeatureCache(fp32_cache).check(tiny_model(**overrides), None)


def test_cache_for_other_weights_or_precision_is_refused(fp32_cache):
    with pytest.raises(FeatureCacheError, match=r"encoders\[languagebind\].weights_sha256"):
        FeatureCache(fp32_cache).check(tiny_model(seed=1), None)
    with pytest.raises(FeatureCacheError, match="autocast: cache 'None', this run 'torch.bfloat16'"):
        FeatureCache(fp32_cache).check(tiny_model(), torch.bfloat16)


def test_training_cli_refuses_a_mismatched_cache(data, fp32_cache, tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--set", "num_workers=0", "--set", "visual.frames_sampled=32", "--set", f"feature_cache={fp32_cache}"])
    assert code == 2 and "frame_sampling.frames_sampled" in capsys.readouterr().err


def test_corrupt_shard_is_named(data, fp32_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_cache, copy)
    shard = copy / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cache = FeatureCache(copy)
    key = next(k for k, (s, _) in cache.entries.items() if s == 1)
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.safetensors' is corrupt: SHA-256"):
        cache.features([key], [False], ["languagebind"])
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.safetensors' is corrupt"):
        FeatureCache(copy).verify()
    (copy / "shard-00000.safetensors").unlink()
    with pytest.raises(FeatureCacheError, match=r"shard-00000\.safetensors' is missing"):
        FeatureCache(copy).verify()


def test_missing_sample_is_named(data, fp32_cache, tmp_path):
    from merv_fast.testing import tiny_llama_tokenizer

    cache = FeatureCache(fp32_cache)
    entries = load_entries(data)
    unknown = entries[0].__class__(index=99, id="newcomer", kind="video", media="videos/elsewhere.mp4",
                                   conversations=CONV)
    dataset = CachedFeatureDataset(cache, entries + [unknown], data.parent, tiny_llama_tokenizer())
    with pytest.raises(FeatureCacheError, match=r"entry 99 \(id 'newcomer'\): media 'video:videos/elsewhere.mp4' "
                                                r"is not in the feature cache"):
        dataset[len(entries)]
    with pytest.raises(FeatureCacheError, match="is not in the feature cache"):
        cache.features(["video:nowhere.mp4"], [False], ["languagebind"])
    with pytest.raises(FeatureCacheError, match="has no index.json"):
        FeatureCache(tmp_path)
