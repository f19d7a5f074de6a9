"""The encoder runner: every mode on CPU is the sequential forward, bit for bit; the `encoders.*` runtime keys; no
wasted work (truncation == the full-depth encoder's layer, SDPA == the release's eager attention); prefetch off CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import merv_fast
from merv_fast.config import ConfigError, EncoderRuntime, apply_overrides, get_preset, load_config
from merv_fast.model.encoders import build_encoder
from merv_fast.runtime.encoders import EncoderRunner, batch_bucket, is_per_frame

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return merv_fast.build_model("tiny", kernels="torch")


def random_pixels(cfg, batch, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, e.frames, 3, e.image_size, e.image_size, generator=g).to(dtype) for e in cfg.encoders]


def reference(model, pixels, is_image):
    """Each encoder called directly; an image's per-frame encoders encode one frame and tile it."""
    out = []
    for enc, px in zip(model.encoders.values(), pixels):
        if is_image and is_per_frame(enc.config):
            out.append(enc(px[:, :1]).expand(-1, px.shape[1], -1, -1))
        else:
            out.append(enc(px))
    return out


@pytest.mark.parametrize("mode", ["sequential", "streams", "graph"])
@pytest.mark.parametrize("is_image", [False, True])
def test_every_mode_on_cpu_is_the_sequential_forward(tiny, mode, is_image):
    runner = EncoderRunner(tiny.encoders, EncoderRuntime(mode=mode))
    pixels = random_pixels(tiny.config, 3, seed=1)
    if is_image:
        pixels = [p[:, :1].expand_as(p) for p in pixels]
    with torch.no_grad():
        got, want = runner(pixels, is_image=is_image), reference(tiny, pixels, is_image)
    assert runner.graph_keys == []  # nothing captured off CUDA
    for name, a, b in zip(tiny.encoders, got, want):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_bf16_encoders_through_the_runner(tiny):
    model = merv_fast.build_model("tiny", kernels="torch", encoder_dtype=torch.bfloat16,
                                  **{"encoders.mode": "streams"})
    model.encoders.load_state_dict({k: v.bfloat16() for k, v in tiny.encoders.state_dict().items()})
    pixels = random_pixels(model.config, 2, seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = model.encode(pixels), reference(model, pixels, False)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_model_encode_goes_through_the_runner(tiny):
    calls = []
    runner = tiny.encoder_runner
    tiny.encoder_runner = lambda pixels, is_image=False: calls.append(is_image) or runner(pixels, is_image)
    try:
        tiny.encode(random_pixels(tiny.config, 1, seed=3), is_image=False)
    finally:
        tiny.encoder_runner = runner
    assert calls == [False]


def test_compiled_encoders_compute_the_same(tiny):
    runner = EncoderRunner(tiny.encoders, EncoderRuntime(compile=True), compile_backend="eager")
    pixels = random_pixels(tiny.config, 1, seed=4)
    with torch.no_grad():
        got, want = runner(pixels), reference(tiny, pixels, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wrong_number_of_inputs_names_the_encoders(tiny):
    with pytest.raises(ValueError, match="languagebind"):
        tiny.encode(random_pixels(tiny.config, 1, seed=0)[:2])


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


# ----------------------------------------------------------------------------------------------- the config keys
def test_encoder_runtime_keys_are_not_encoder_names():
    cfg = apply_overrides(TINY, {"encoders.mode": "graph", "encoders.compile": True, "encoders.prefetch": True,
                                 "encoders.dinov2.layers_run": 1})
    assert cfg.encoder_runtime == EncoderRuntime(mode="graph", compile=True, prefetch=True)
    assert cfg.encoder("dinov2").layers_run == 1 and [e.name for e in cfg.encoders] == [e.name for e in TINY.encoders]
    assert TINY.encoder_runtime == EncoderRuntime()  # defaults: sequential, no compile, no prefetch
    model = merv_fast.build_model("tiny", device="meta", encoders__mode="streams")
    assert model.encoder_runner.mode == "streams"


def test_encoder_runtime_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nencoders:\n  mode: streams\n  prefetch: true\n  siglip:\n    layers_run: 1\n")
    cfg = load_config(config_file=path)
    assert cfg.encoder_runtime.mode == "streams" and cfg.encoder_runtime.prefetch
    assert cfg.encoder("siglip").layers_run == 1


@pytest.mark.parametrize("key, value, message", [
    ("encoders.mode", "parallel", r"encoders.mode='parallel'; choose one of \['sequential', 'streams', 'graph'\]"),
    ("encoders.compile", "yes please", "encoders.compile must be true or false"),
    ("encoders.prefetch", 1, "encoders.prefetch must be true or false"),
    ("encoders.mode.fast", True, "unknown key 'fast'"),
    ("encoders.clip.weights", "/w", "no encoder 'clip'"),
    ("encoders.dinov2.attention", "flash", r"attention='flash'; choose one of \['sdpa', 'eager'\]"),
])
def test_bad_runtime_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TINY, {key: value})


# ----------------------------------------------------------------------------------------------- no wasted work
def _strip(name, cfg, hidden, batch, frames):
    """A block's raw output -> the encoder's features (what its forward returns after the block taken)."""
    if name == "languagebind":
        return hidden[:, 1:].unflatten(0, (batch, frames))
    if name == "dinov2":
        return hidden[:, 1 + cfg.registers:].unflatten(0, (batch, frames))
    return hidden.unflatten(0, (batch, frames))  # siglip: no CLS token


@pytest.mark.parametrize("name", ["languagebind", "dinov2", "siglip"])
def test_truncated_encoder_equals_the_full_encoders_layer(name):
    """Blocks after the layer taken are neither built nor run, and nothing is lost: the truncated encoder's output
    is the full-depth encoder's hidden state after that layer."""
    cfg = TINY.encoder(name)
    assert cfg.layers_run < cfg.num_layers
    torch.manual_seed(5)
    full = build_encoder(dataclasses.replace(cfg, layers_run=cfg.num_layers)).eval()
    truncated = build_encoder(cfg).eval()
    missing, unexpected = truncated.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(f".{cfg.layers_run}." in k for k in unexpected)
    taken = {}
    full.blocks[cfg.layers_run - 1].register_forward_hook(
        lambda _m, _i, out: taken.setdefault("x", out[0] if isinstance(out, tuple) else out))
    x = torch.randn(2, cfg.frames, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        full(x)
        got = truncated(x)
    assert torch.equal(got, _strip(name, cfg, taken["x"], 2, cfg.frames))


def test_vivit_takes_its_last_layer_so_nothing_is_truncated():
    vivit = get_preset("merv-7b").encoder("vivit")
    assert vivit.layers_run == vivit.num_layers and vivit.final_norm


@pytest.mark.parametrize("name", [e.name for e in TINY.encoders])
def test_sdpa_equals_the_releases_eager_attention(name):
    cfg = TINY.encoder(name)
    torch.manual_seed(6)
    sdpa = build_encoder(cfg).eval()
    eager = build_encoder(dataclasses.replace(cfg, attention="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, cfg.frames, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), eager(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- encoders.prefetch
def _train_helpers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    import helpers

    return helpers


def test_prefetch_is_off_on_cpu():
    from merv_fast.train.parallel import TrainModule
    from merv_fast.train.step import Stepper

    model = merv_fast.build_model("tiny", kernels="torch", encoders__prefetch=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stepper = Stepper(TrainModule(model), opt, None, device=torch.device("cpu"))
    assert model.config.encoder_runtime.prefetch and not stepper.prefetch_encoders


def test_features_encoded_ahead_are_the_live_ones():
    """What `encoders.prefetch` does on CUDA (run here on CPU): prepare_on_device encodes, the step uses those
    features instead of encoding again, and the steps are bit for bit those without it."""
    helpers = _train_helpers()
    batches = [[helpers.make_batch("video", 2, 20, 3, seed=1)], [helpers.make_batch("image", 2, 24, 5, seed=2)],
               [helpers.make_batch("text", 2, 16, 4, seed=3)]]
    results = {}
    for ahead in (False, True):
        model, _, stepper = helpers.make_stepper(seed=0)
        stepper.prefetch_encoders = ahead
        calls = []
        runner = model.encoder_runner
        model.encoder_runner = lambda pixels, is_image=False: calls.append(is_image) or runner(pixels, is_image)
        prepared = [[stepper.prepare_on_device(mb) for mb in step] for step in batches]
        assert all((p.features is not None) == (ahead and p.pixels is not None) for s in prepared for p in s)
        results[ahead] = [(r.loss, r.grad_norm) for r in (stepper.step(s) for s in prepared)]
        # once per visual micro-batch either way (ahead, or in the step), plus the text-only batch's dummy shapes
        assert calls == [False, True, False]
    assert results[False] == results[True]


@pytest.mark.parametrize("mode", ["sequential", "graph"])
def test_an_image_encoded_once_and_tiled_equals_its_repeated_frames(tiny, mode):
    """Through the data path: an image (one decoded frame) vs the same frame as a video of `frames_sampled` copies."""
    from merv_fast.data.preprocess import preprocess_batch

    cfg = tiny.config
    frame = torch.randint(0, 256, (2, 1, 40, 52, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    video = frame.expand(-1, cfg.frames_sampled, -1, -1, -1).contiguous()
    flip = torch.tensor([False, True])
    as_image = preprocess_batch(frame, cfg.encoders, cfg.frames_sampled, flip, is_image=True)
    as_video = preprocess_batch(video, cfg.encoders, cfg.frames_sampled, flip)
    runner = EncoderRunner(tiny.encoders, EncoderRuntime(mode=mode))
    with torch.no_grad():
        tiled, full = runner(as_image, is_image=True), runner(as_video, is_image=False)
    for enc, a, b in zip(cfg.encoders, tiled, full):
        assert a.shape == b.shape
        if is_per_frame(enc):  # encoded once: 1 frame instead of T in the batch, so fp32 rounding may differ
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=enc.name)
            assert a.stride(1) == 0  # tiled, not recomputed
        else:  # the video encoders see every repeated frame either way
            assert torch.equal(a, b), enc.name
