"""pytest-benchmark suite: fused per-encoder preprocessing on CPU, uint8 frames -> all four encoders' inputs.

- native:    torch.ops.merv_fast.preprocess_frames (kernels/csrc/preprocess.cpp), one pass over the frames;
- reference: `preprocess_reference` (F.interpolate per encoder);
- pil_loop:  the release's way: per encoder, per frame, PIL `Image.resize` for the antialiased encoders and a
             torch bilinear resize + center crop for LanguageBind, then to float and normalise (needs Pillow).
CI (`--benchmark-disable`): tiny shapes, each runs once as a test. Measured (`--benchmark-enable`): 8 frames of
360x640 into the merv-7b encoders' 224x224 inputs (their strides: 4 + 4 + 8 + 4 outputs).
Measure: `python -m pytest bench/bench_preprocess.py --benchmark-enable`.
"""

import pytest
import torch
import torch.nn.functional as F

import merv_fast.data.preprocess as data_preprocess  # wires the op's native check to merv_fast.native
from merv_fast import native
from merv_fast.config import get_preset
from merv_fast.kernels.preprocess import preprocess, preprocess_reference, short_side_geometry


def workload(full: bool):
    cfg = get_preset("merv-7b" if full else "tiny")
    t, (h, w) = (8, (360, 640)) if full else (2, (48, 64))
    # frames_sampled=32 strides (2, 2, 1, 2) kept, on t frames
    specs = [data_preprocess.encoder_input_spec(e, cfg.frames_sampled) for e in cfg.encoders]
    frames = torch.randint(0, 256, (1, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return frames, specs, torch.tensor([True])


def pil_loop(frames, specs, flip):
    import numpy as np
    from PIL import Image

    outs = []
    for spec in specs:
        picked = frames[:, ::spec.frame_stride]
        mean = torch.tensor(spec.mean).view(3, 1, 1)
        std = torch.tensor(spec.std).view(3, 1, 1)
        per_sample = []
        for b in range(picked.shape[0]):
            per_frame = []
            for t in range(picked.shape[1]):
                if spec.antialias:  # the release: a PIL image per frame, PIL's resize
                    filt = Image.BICUBIC if spec.interpolation == "bicubic" else Image.BILINEAR
                    img = Image.fromarray(picked[b, t].numpy()).resize((spec.size, spec.size), filt)
                    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
                else:  # LanguageBind's tensor transforms, frame by frame
                    x = picked[b, t].permute(2, 0, 1).float().div(255).unsqueeze(0)
                    nh, nw, top, left = short_side_geometry(x.shape[-2], x.shape[-1], spec.size)
                    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)[0]
                    x = x[:, top:top + spec.size, left:left + spec.size]
                    if spec.random_flip and flip is not None and flip[b]:
                        x = x.flip(-1)
                per_frame.append((x - mean) / std)
            per_sample.append(torch.stack(per_frame))
        outs.append(torch.stack(per_sample))
    return outs


IMPLS = {"native": preprocess, "reference": preprocess_reference, "pil_loop": pil_loop}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_preprocess_speed(benchmark, impl):
    if impl == "native" and native.op_reason("preprocess_frames") is not None:
        pytest.skip(f"native op unavailable: {native.op_reason('preprocess_frames')}")
    if impl == "pil_loop":
        pytest.importorskip("PIL.Image")
    frames, specs, flip = workload(full=not benchmark.disabled)
    outs = benchmark(IMPLS[impl], frames, specs, flip)
    ref = preprocess_reference(frames, specs, flip)
    tol = 1e-4 if impl != "pil_loop" else 0.2  # PIL rounds to uint8 and clips bicubic overshoot (see the tests)
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and (o - r).abs().mean() < tol
    benchmark.extra_info["frames"] = frames.shape[1]
    benchmark.extra_info["shape"] = list(frames.shape)
    benchmark.extra_info["threads"] = torch.get_num_threads()
