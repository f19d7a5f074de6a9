"""LLaVA-format entries (validation with named reasons), deterministic flips and replacements, collation, and the
dataset end to end on real synthetic media, broken files included."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from merv_fast.data.collate import collate
from merv_fast.data.dataset import (
    DatasetError,
    Entry,
    VideoLLaVADataset,
    counter_hash,
    load_entries,
    parse_entries,
    summarize_bad_samples,
)
from merv_fast.data.prompts import IGNORE_INDEX, tokenize_conversation
from merv_fast.testing import tiny_llama_tokenizer

CONV = [{"from": "human", "value": "<video>\nWhat is happening in the video?"},
        {"from": "gpt", "value": "A man is playing a guitar."}]


def write_json(tmp_path, data) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def problems_of(data):
    return parse_entries(data)[1]


# ------------------------------------------------------------------------------------------------ validation
def test_valid_entries_of_every_kind():
    entries, problems = parse_entries([
        {"id": "v", "video": "videos/a.mp4", "conversations": CONV, "time": [1.5, 4.0]},
        {"id": 7, "image": "images/b.jpg", "conversations": CONV},
        {"id": "t", "conversations": CONV[:1]},  # may end on a human turn
        {"id": "w", "video": "c.mp4", "conversations": CONV, "time": [float("nan"), float("nan")]},
    ])
    assert problems == []
    assert [(e.index, e.id, e.kind, e.media) for e in entries] == [
        (0, "v", "video", "videos/a.mp4"), (1, "7", "image", "images/b.jpg"), (2, "t", "text", None),
        (3, "w", "video", "c.mp4")]
    assert entries[0].clip == (1.5, 4.0)
    assert entries[3].clip == (0.0, None)  # the release's NaN handling
    assert entries[0].num_words() == 13  # "<video>\nWhat ..." splits into 7, the answer into 6


@pytest.mark.parametrize("entry, key, words", [
    ({"video": "a.mp4", "conversations": CONV}, "id", "missing key"),
    ({"id": [1], "conversations": CONV}, "id", "string or an integer"),
    ({"id": "x"}, "conversations", "missing key"),
    ({"id": "x", "conversations": []}, "conversations", "empty conversation"),
    ({"id": "x", "conversations": "hi"}, "conversations", "must be a list"),
    ({"id": "x", "conversations": [{"from": "user", "value": "hi"}]}, "conversations[0].from", "unknown role"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "conversations[0].value", "missing key"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}]}, "conversations[0].value", "must be a string"),
    ({"id": "x", "conversations": [CONV[0], CONV[0]]}, "conversations", "alternate"),
    ({"id": "x", "conversations": [CONV[1], CONV[0]]}, "conversations", "starting with human"),
    ({"id": "x", "video": 5, "conversations": CONV}, "video", "must be a string path"),
    ({"id": "x", "video": "a.mp4", "image": "b.jpg", "conversations": CONV}, "image", "both"),
    ({"id": "x", "video": "a.mp4", "conversations": CONV, "time": [3, 1]}, "time", "not after start"),
    ({"id": "x", "image": "a.jpg", "conversations": CONV, "time": [0, 1]}, "time", "only valid on a video"),
    ("not an object", None, "must be an object"),
])
def test_invalid_entries_are_named(entry, key, words):
    found = problems_of([{"id": "ok", "conversations": CONV}, entry])
    assert found, entry
    assert all(p.index == 1 for p in found)
    assert any(p.key == key and words in p.reason for p in found), [str(p) for p in found]


@pytest.mark.parametrize("path", ["../outside.mp4", "videos/../../etc/passwd", "/etc/passwd", "C:\\x.mp4",
                                  "..\\up.mp4", ""])
def test_media_paths_outside_the_root_are_refused(path):
    (problem,) = problems_of([{"id": "evil", "video": path, "conversations": CONV}])
    assert problem.key == "video" and problem.id == "evil" and problem.index == 0
    assert any(w in problem.reason for w in ("absolute", "'..'", "empty"))


def test_load_entries_names_every_bad_entry(tmp_path):
    path = write_json(tmp_path, [{"id": "good", "conversations": CONV},
                                 {"id": "a1", "conversations": []},
                                 {"id": "b2", "image": "../x.jpg", "conversations": CONV}])
    with pytest.raises(DatasetError) as info:
        load_entries(path)
    message = str(info.value)
    assert "entry 1 (id 'a1'): conversations: empty conversation" in message
    assert "entry 2 (id 'b2'): image:" in message
    assert [p.index for p in info.value.problems] == [1, 2]
    assert [e.id for e in load_entries(path, on_invalid="skip")] == ["good"]


@pytest.mark.parametrize("content, words", [(None, "no such file"), ("{not json", "not valid JSON"),
                                            ('{"id": 1}', "must be a list")])
def test_file_level_problems(tmp_path, content, words):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=words):
        load_entries(path)


# ------------------------------------------------------------------------------------------------ determinism
def make_entries(kinds):
    return [Entry(i, f"e{i}", k, None if k == "text" else f"{k}/{i}.bin", CONV) for i, k in enumerate(kinds)]


def test_counter_hash_separates_seed_and_epoch():
    assert counter_hash(0, 1, 5) != counter_hash(1, 0, 5)
    assert counter_hash(3, 2, 1) == counter_hash(3, 2, 1)
    assert len({counter_hash(0, 0, i) for i in range(1000)}) == 1000


def test_flips_depend_only_on_seed_epoch_index(tmp_path):
    tok = tiny_llama_tokenizer()
    entries = make_entries(["video"] * 200)
    a = VideoLLaVADataset(entries, tmp_path, tok, seed=3)
    b = VideoLLaVADataset(entries, tmp_path, tok, seed=3)
    forward = [a.flip_for(i) for i in range(200)]
    backward = [b.flip_for(i) for i in reversed(range(200))][::-1]
    assert forward == backward
    assert 70 < sum(forward) < 130  # p = 0.5
    # Threads interleave arbitrarily: same answers (no shared RNG state to race on).
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(a.flip_for, range(200))) == forward
    a.set_epoch(1)
    assert [a.flip_for(i) for i in range(200)] != forward
    assert [a.flip_for(i, epoch=0) for i in range(200)] == forward
    assert [VideoLLaVADataset(entries, tmp_path, tok, seed=4).flip_for(i) for i in range(200)] != forward
    assert not any(VideoLLaVADataset(entries, tmp_path, tok, random_flip=False).flip_for(i) for i in range(20))


def test_replacements_keep_the_modality_and_are_pure(tmp_path):
    tok = tiny_llama_tokenizer()
    kinds = ["video", "image", "text"] * 20
    ds = VideoLLaVADataset(make_entries(kinds), tmp_path, tok, seed=11)
    table = {(i, a): ds.replacement_for(i, a) for i in range(len(kinds)) for a in range(1, 4)}
    again = VideoLLaVADataset(make_entries(kinds), tmp_path, tok, seed=11)
    assert {k: again.replacement_for(*k) for k in reversed(list(table))} == table
    for (i, _), j in table.items():
        assert kinds[j] == kinds[i] and j != i
    assert len({table[(i, 1)] for i in range(0, 60, 3)}) > 5  # spread over the pool, not one fixed victim
    assert {(i, a): ds.replacement_for(i, a, epoch=1) for (i, a) in table} != table


def test_no_replacement_without_another_sample_of_the_kind(tmp_path):
    ds = VideoLLaVADataset(make_entries(["video", "image", "image"]), tmp_path, tiny_llama_tokenizer())
    with pytest.raises(DatasetError, match="no other video entry"):
        ds.replacement_for(0, 1)


def test_modality_lengths_words_and_tokens(tmp_path):
    tok = tiny_llama_tokenizer()
    ds = VideoLLaVADataset(make_entries(["video", "text"]), tmp_path, tok)
    assert ds.modality_lengths() == [("video", 13), ("text", 13)]
    ids, _ = tokenize_conversation(CONV, tok, "llama2-base", 2048, has_visual=True)
    assert ds.modality_lengths("tokens")[0] == ("video", len(ids))


def test_text_only_sample_needs_no_media(tmp_path):
    tok = tiny_llama_tokenizer()
    ds = VideoLLaVADataset(make_entries(["text", "text"]), tmp_path, tok, max_length=2048)
    s = ds[1]
    assert (s.index, s.id, s.kind, s.frames) == (1, "e1", "text", None)
    assert (s.input_ids, s.labels) == tokenize_conversation(CONV, tok, "llama2-base", 2048, has_visual=False)


# ------------------------------------------------------------------------------------------------ collate
def test_collate_pads_right_and_stacks_frames(tmp_path):
    from merv_fast.data.dataset import Sample

    frames = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    a = Sample(0, "a", "video", frames, [1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7], True)
    b = Sample(3, "b", "video", frames + 1, [1, 9], [IGNORE_INDEX, 9], False)
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert batch.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.frames.shape == (2, 2, 4, 5, 3) and batch.frames.dtype == torch.uint8
    assert torch.equal(batch.frames[1], torch.from_numpy(frames + 1))
    assert batch.is_image.tolist() == [False, False] and batch.flip.tolist() == [True, False]
    assert (batch.kind, batch.indices, batch.ids) == ("video", [0, 3], ["a", "b"])
    assert collate([a, b], pad_token_id=0, max_length=3).input_ids.shape == (2, 3)

    # Different source sizes cannot be stacked: per-sample tensors.
    c = Sample(4, "c", "video", np.zeros((2, 6, 6, 3), np.uint8), [1], [IGNORE_INDEX], False)
    mixed = collate([a, c], pad_token_id=0)
    assert isinstance(mixed.frames, list) and mixed.frames[1].shape == (2, 6, 6, 3)

    text = collate([Sample(5, "t", "text", None, [1, 2], [1, 2], False)], pad_token_id=0)
    assert text.frames is None and text.kind == "text" and text.is_image.tolist() == [False]
    image = collate([Sample(6, "i", "image", frames[:1], [1], [IGNORE_INDEX], False)], pad_token_id=0)
    assert image.frames.shape == (1, 1, 4, 5, 3) and image.is_image.tolist() == [True]
    with pytest.raises(ValueError, match="mixes text-only"):
        collate([a, Sample(5, "t", "text", None, [1], [1], False)], pad_token_id=0)


# ------------------------------------------------------------------------------------------------ real media
def real_dataset(synth_dataset, **kw):
    args = dict(seed=7)
    args.update(kw)
    return VideoLLaVADataset(synth_dataset["json"], synth_dataset["root"], tiny_llama_tokenizer(), **args)


def test_real_samples_decode_and_tokenize(synth_dataset):
    ds = real_dataset(synth_dataset)
    tok = ds.tokenizer
    for i, entry in enumerate(ds.entries[: len(synth_dataset["good"])]):
        s = ds[i]
        assert (s.index, s.requested, s.id, s.kind, s.bad_samples) == (i, i, entry.id, entry.kind, [])
        if entry.kind == "video":
            assert s.frames.shape[0] == 32 and s.frames.shape[-1] == 3 and s.frames.dtype in (np.uint8, torch.uint8)
        elif entry.kind == "image":
            assert s.frames.shape[0] == 1 and s.frames.shape[-1] == 3
        else:
            assert s.frames is None
        assert (s.input_ids, s.labels) == tokenize_conversation(entry.conversations, tok, "llama2-base", 2048,
                                                                has_visual=entry.kind != "text")


def test_broken_samples_are_replaced_deterministically(synth_dataset, caplog):
    n_good = len(synth_dataset["good"])
    broken = range(n_good, len(synth_dataset["good"]) + len(synth_dataset["broken"]))
    first = real_dataset(synth_dataset)
    with caplog.at_level("WARNING", logger="merv_fast.data"):
        got = {i: first[i] for i in broken}
    for i, s in got.items():
        assert s.requested == i and s.index != i and s.index < n_good  # a good sample took its place
        assert s.kind == first.entries[i].kind  # of the same modality
        assert s.bad_samples[0].index == i and s.bad_samples[0].replacement == s.index
        assert s.bad_samples[0].path.endswith(first.entries[i].media)
    assert "broken/zero.mp4" in caplog.text and "zero bytes" in caplog.text

    # Another run, other order: the same replacements and flips.
    second = real_dataset(synth_dataset)
    again = {i: second[i] for i in reversed(broken)}
    assert {i: (s.index, s.flip) for i, s in again.items()} == {i: (s.index, s.flip) for i, s in got.items()}
    summary = first.bad_summary()
    # A replacement may itself be broken (the draw is pure, never "skip what this worker saw fail"): every failure
    # on the way is counted, each broken entry once in the distinct list.
    assert summary["failures"] >= len(broken) and summary["distinct_entries"] == len(broken)
    assert sorted(e["index"] for e in summary["entries"]) == list(broken)
    assert summarize_bad_samples([b for s in got.values() for b in s.bad_samples]) == summary

    # Another seed picks differently somewhere (5 broken videos, several candidates each).
    other = real_dataset(synth_dataset, seed=8)
    assert {i: other[i].index for i in broken} != {i: s.index for i, s in got.items()}


def test_worker_count_does_not_change_samples(synth_dataset):
    from torch.utils.data import DataLoader

    from merv_fast.data.sampler import ModalityLengthGroupedSampler

    ds = real_dataset(synth_dataset)
    ds.set_epoch(1)
    sampler = ModalityLengthGroupedSampler(ds.modality_lengths(), global_batch_size=2, seed=7)
    sampler.set_epoch(1)
    pad = ds.tokenizer.unk_token_id

    def run(workers):
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                            collate_fn=lambda s: collate(s, pad_token_id=pad))
        batches = list(loader)
        return ([(b.kind, b.indices, b.flip.tolist(), b.input_ids.tolist()) for b in batches],
                sorted((b.index, b.replacement) for batch in batches for b in batch.bad_samples))

    zero, two = run(0), run(2)
    assert zero == two
    assert len(zero[1]) >= len(synth_dataset["broken"])  # every broken entry was met and replaced, counted per batch


def test_attempts_are_bounded(tmp_path, synth_dataset):
    entries = [Entry(i, f"v{i}", "video", f"missing/{i}.mp4", CONV) for i in range(4)]
    ds = VideoLLaVADataset(entries, synth_dataset["root"], tiny_llama_tokenizer(), max_attempts=3)
    with pytest.raises(DatasetError, match="3 replacement attempts failed") as info:
        ds[0]
    assert "missing file" in str(info.value)
    assert len(ds.bad_samples) == 4  # the sample itself and 3 replacements, all recorded


def test_clip_window_selects_the_frames_of_the_window(synth_dataset):
    from merv_fast.data.decode import decode_video, probe_video
    from merv_fast.data.frames import sample_frame_indices

    video = next(e for e in synth_dataset["good"] if e.get("video", "").endswith("h264_mp4.mp4"))
    path = synth_dataset["root"] / video["video"]
    info = probe_video(path)
    entries, problems = parse_entries([dict(video, time=[0.5, 1.0]), video])
    assert problems == []
    ds = VideoLLaVADataset(entries, synth_dataset["root"], tiny_llama_tokenizer())
    windowed, whole = ds[0].frames, ds[1].frames
    expected = sample_frame_indices(info.num_frames, info.fps, 32, 0.5, 1.0)
    assert expected != sample_frame_indices(info.num_frames, info.fps, 32)
    assert torch.equal(torch.as_tensor(windowed), decode_video(path, expected))
    assert not torch.equal(torch.as_tensor(windowed), torch.as_tensor(whole))
