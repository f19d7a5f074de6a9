"""CudaPrefetcher (merv_fast/data/prefetch.py): a pass-through on CPU; on a GPU the next batch is copied and
preprocessed on a side stream, and what it hands over is correct, made on that stream, and not recycled early."""

import collections
import dataclasses

import pytest
import torch

from merv_fast.data.prefetch import CudaPrefetcher, map_tensors
from merv_fast.kernels.preprocess import EncoderInputSpec, preprocess

HALF = (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def specs(size):
    return [EncoderInputSpec(size, "short_side_crop", "bilinear", False, CLIP_MEAN, CLIP_STD, frame_stride=2,
                             random_flip=True),
            EncoderInputSpec(size, "squash", "bicubic", True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             frame_stride=2),
            EncoderInputSpec(size, "squash", "bilinear", True, HALF, HALF, frame_stride=1),
            EncoderInputSpec(size, "squash", "bicubic", True, HALF, HALF, frame_stride=2, out_dtype=torch.bfloat16)]


def make_batches(n, b, t, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"frames": torch.randint(0, 256, (b, t, h, w, 3), generator=gen, dtype=torch.uint8),
             "flip": torch.rand(b, generator=gen) < 0.5,
             "input_ids": torch.randint(0, 1000, (b, 17), generator=gen),
             "id": f"batch{i}"} for i in range(n)]


def preprocess_fn(encoder_specs):
    def fn(batch):
        out = dict(batch)
        out["pixels"] = preprocess(out.pop("frames"), encoder_specs, batch["flip"])
        return out
    return fn


def test_cpu_pass_through_equals_direct():
    batches = make_batches(3, 2, 4, 37, 53)
    fn = preprocess_fn(specs(28))
    direct = [fn(b) for b in batches]
    got = list(CudaPrefetcher(batches, "cpu", fn))
    assert len(got) == len(direct) == 3
    for g, d in zip(got, direct):
        assert g["id"] == d["id"] and torch.equal(g["input_ids"], d["input_ids"]) and torch.equal(g["flip"], d["flip"])
        assert all(torch.equal(a, b) for a, b in zip(g["pixels"], d["pixels"]))
    assert len(CudaPrefetcher(batches, "cpu", fn)) == 3
    assert [b["id"] for b in CudaPrefetcher(batches, "cpu")] == ["batch0", "batch1", "batch2"]  # identity default


def test_map_tensors_walks_nested_batches():
    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass(frozen=True)
    class Batch:
        frames: torch.Tensor
        extra: dict
        name: str

    batch = Batch(torch.ones(2), {"x": [torch.zeros(1), Pair(torch.ones(1), 3)]}, "n")
    doubled = map_tensors(batch, lambda t: t + 1)
    assert isinstance(doubled, Batch) and doubled.name == "n" and torch.equal(doubled.frames, torch.full((2,), 2.0))
    x = doubled.extra["x"]
    assert torch.equal(x[0], torch.ones(1)) and isinstance(x[1], Pair) and torch.equal(x[1].a, torch.full((1,), 2.0))
    assert x[1].b == 3 and torch.equal(batch.frames, torch.ones(2))  # the original is untouched


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_prefetch_matches_direct_on_side_stream_and_survives_reuse():
    device = torch.device("cuda")
    encoder_specs = specs(224)
    batches = make_batches(5, 2, 32, 240, 320, seed=1)
    fn = preprocess_fn(encoder_specs)
    # The non-prefetched path on the current stream (this also autotunes the kernel, so both paths run one config).
    direct = [fn({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}) for b in batches]
    torch.cuda.synchronize()

    consumer = torch.cuda.current_stream(device)
    streams_used = []

    def slow_fn(batch):
        streams_used.append(torch.cuda.current_stream(device))
        # Keeps the side stream busy before the kernels write: a consumer that did not wait for the event would read
        # unwritten outputs.
        torch.cuda._sleep(20_000_000)
        return fn(batch)

    kept, snapshots = [], []
    for i, batch in enumerate(CudaPrefetcher(batches, device, slow_fn)):
        assert batch["input_ids"].is_cuda and batch["flip"].is_cuda and batch["id"] == f"batch{i}"
        # The consumer's stream is busy for a while before it reads this batch; the batch is then dropped (every
        # other one) while that read is still queued. Without record_stream the side stream's next allocations
        # could take its memory and overwrite it before the queued read runs.
        torch.cuda._sleep(50_000_000)
        snapshots.append([p.clone() for p in batch["pixels"]])
        if i % 2:
            kept.append(batch)
        del batch
    torch.cuda.synchronize()

    assert len(snapshots) == len(batches)
    assert streams_used and all(s != consumer for s in streams_used), "preprocessing did not run on a side stream"
    for i, snap in enumerate(snapshots):
        for got, want in zip(snap, direct[i]["pixels"]):
            assert torch.equal(got, want), f"batch {i}: prefetched output differs from the direct path"
    for k, batch in enumerate(kept):  # batches kept across iterations still hold their values
        i = 2 * k + 1
        assert torch.equal(batch["input_ids"].cpu(), batches[i]["input_ids"])
        for got, want in zip(batch["pixels"], direct[i]["pixels"]):
            assert torch.equal(got, want), f"kept batch {i} was overwritten"


@pytest.mark.gpu
def test_cuda_prefetch_pins_and_reports_loader_errors():
    device = torch.device("cuda")
    seen = []

    def loader():
        yield {"x": torch.arange(4)}
        yield {"x": torch.arange(4) + 1}
        raise RuntimeError("bad batch")

    def fn(batch):
        seen.append(batch["x"].device)
        return batch

    prefetcher = iter(CudaPrefetcher(loader(), device, fn))
    assert torch.equal(next(prefetcher)["x"].cpu(), torch.arange(4))
    assert torch.equal(next(prefetcher)["x"].cpu(), torch.arange(4) + 1)  # the error waits for its own turn
    with pytest.raises(RuntimeError, match="bad batch"):
        next(prefetcher)
    with pytest.raises(StopIteration):
        next(prefetcher)
    assert all(d.type == "cuda" for d in seen)
