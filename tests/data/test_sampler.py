"""The split-modality, length-grouped sampler: single-modality batches, grouping, sharding, determinism, exact resume."""

import random

import pytest

from merv_fast.data.sampler import ModalityLengthGroupedSampler, _deal_into_buckets


def make_modality_lengths(n=301, seed=0):
    rng = random.Random(seed)
    kinds = ["video"] * 40 + ["image"] * 50 + ["text"] * 10
    return [(rng.choice(kinds), rng.randint(5, 400)) for _ in range(n)]


ML = make_modality_lengths()


def sampler(**kw):
    args = dict(global_batch_size=8, world_size=1, rank=0, seed=0)
    args.update(kw)
    return ModalityLengthGroupedSampler(ML, **args)


def test_batches_are_single_modality_and_cover_every_sample():
    s = sampler()
    batches = list(s)
    assert len(batches) == len(s) == s.num_global_batches()
    for b in batches:
        assert len(b) == 8 and len({ML[i][0] for i in b}) == 1
    seen = {i for b in batches for i in b}
    assert seen == set(range(len(ML)))
    # Only each group's last batch is padded (with samples of the same group): few repeats.
    assert sum(len(b) for b in batches) - len(ML) < 3 * 8


def test_release_split_mixes_images_and_videos_but_never_text():
    batches = list(sampler(split="release"))
    assert any({ML[i][0] for i in b} == {"video", "image"} for b in batches)
    for b in batches:
        kinds = {ML[i][0] for i in b}
        assert kinds == {"text"} or "text" not in kinds


def test_release_bool_modalities_are_accepted():
    pairs = [(kind != "text", length) for kind, length in ML]
    a = ModalityLengthGroupedSampler(pairs, 8, split="release")
    b = sampler(split="release")
    assert list(a) == list(b)


def test_length_grouping_within_rank_shares():
    # Each global batch is dealt into rank shares of similar total length; within a share the spread is smaller than
    # in random batches of the same size.
    world, gbs = 4, 32
    ranks = [sampler(global_batch_size=gbs, world_size=world, rank=r) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    for step in range(len(per_rank[0])):
        totals = [sum(ML[i][1] for i in per_rank[r][step]) for r in range(world)]
        assert max(totals) - min(totals) <= max(ML[i][1] for r in range(world) for i in per_rank[r][step])
    # The longest batch comes first (an OOM shows at step 1), as in the release.
    longest = max(length + (576 if kind != "text" else 0) for kind, length in ML)
    first = [i for r in range(world) for i in per_rank[r][0]]
    assert max(ML[i][1] + (576 if ML[i][0] != "text" else 0) for i in first) == longest


def test_deal_into_buckets_is_the_release_greedy_rule():
    # The lengths of the worked example in the release's batching_utils.py comments, dealt by its `reindex_batch`
    # rule: each sample (longest first) to the bucket with the smallest total, a full bucket taking no more.
    lengths = {4: 91, 3: 21, 0: 20, 5: 18, 8: 93, 10: 92, 1: 90, 2: 21}
    assert _deal_into_buckets([4, 3, 0, 5], lengths, 2) == [[4, 5], [3, 0]]  # 91 | 21, 20 to the lighter; full
    assert _deal_into_buckets([8, 10, 1, 2], lengths, 2) == [[8, 2], [10, 1]]


def test_micro_batches_hold_similar_lengths():
    # Sorted global batches cut into micro-batches: a micro-batch's length spread is far below random pairing's.
    s = sampler(global_batch_size=32, micro_batch_size=4)
    spread = [max(ML[i][1] for i in m) - min(ML[i][1] for i in m) for m in s]
    rng = random.Random(1)
    shuffled = list(range(len(ML)))
    rng.shuffle(shuffled)
    random_spread = [max(ML[i][1] for i in shuffled[j:j + 4]) - min(ML[i][1] for i in shuffled[j:j + 4])
                     for j in range(0, len(ML) - 3, 4)]
    assert sum(spread) / len(spread) < 0.5 * sum(random_spread) / len(random_spread)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_are_disjoint_covering_and_equal_in_steps(world):
    ranks = [sampler(global_batch_size=16, world_size=world, rank=r, micro_batch_size=2) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    # Step by step, the ranks' micro-batches together are exactly the global batch's samples, and of one modality.
    globals_ = ranks[0].global_batches()
    steps_per_global = ranks[0].micro_batches_per_global_batch
    for k, gb in enumerate(globals_):
        got = [i for r in range(world) for m in per_rank[r][k * steps_per_global:(k + 1) * steps_per_global]
               for i in m]
        assert sorted(got) == sorted(gb)
        assert len({ML[i][0] for i in got}) == 1
    all_items = [i for r in per_rank for m in r for i in m]
    assert set(all_items) == set(range(len(ML)))
    # Global batches' contents do not depend on the world size (only their split across ranks does).
    assert [sorted(b) for b in globals_] == [sorted(b) for b in sampler(global_batch_size=16).global_batches()]


def test_seed_and_epoch_change_the_order_and_the_same_give_the_same():
    base = list(sampler())
    assert list(sampler()) == base
    assert list(sampler(seed=1)) != base
    s = sampler()
    s.set_epoch(1)
    assert list(s) != base
    s.set_epoch(0)
    assert list(s) == base


@pytest.mark.parametrize("k", [0, 1, 5, 17])
def test_exact_resume(k):
    full = sampler(seed=5, micro_batch_size=2)
    full.set_epoch(2)
    expected = list(full)
    s = sampler(seed=5, micro_batch_size=2)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(k)]
    state = s.state_dict()
    assert state["position"] == k and state["epoch"] == 2 and state["seed"] == 5
    resumed = sampler(seed=0, micro_batch_size=2)  # the seed comes from the state
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer re-setting the same epoch keeps the position
    assert head + list(resumed) == expected


def test_resume_with_explicit_consumed_position_and_next_epoch():
    s = sampler()
    it = iter(s)
    for _ in range(6):  # a prefetching loader pulled 6, the loop consumed 4
        next(it)
    state = s.state_dict(position=4)
    resumed = sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == list(sampler())[4:]
    resumed.set_epoch(1)
    assert resumed.position == 0
    fresh = sampler()
    fresh.set_epoch(1)
    assert list(resumed) == list(fresh)


def test_resume_onto_another_world_size_at_a_global_batch_boundary():
    two = [sampler(global_batch_size=16, world_size=2, rank=r, micro_batch_size=4) for r in range(2)]
    for s in two:
        it = iter(s)
        for _ in range(2 * 3):  # 3 global batches of 2 micro-batches each
            next(it)
    state = two[0].state_dict()
    one = sampler(global_batch_size=16, micro_batch_size=8)
    one.load_state_dict(state)
    rest = [i for m in one for i in m]
    remaining_globals = sampler(global_batch_size=16).global_batches()[3:]
    assert sorted(rest) == sorted(i for b in remaining_globals for i in b)
    mid = dict(state, position=3)
    with pytest.raises(ValueError, match="global-batch boundary"):
        one.load_state_dict(mid)
    with pytest.raises(ValueError, match="global_batch_size"):
        sampler(global_batch_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        ModalityLengthGroupedSampler(ML[:-1], 16).load_state_dict(state)


def test_small_and_empty_groups():
    ml = [("video", 10)] * 3 + [("image", 5)] * 20  # videos fewer than one batch, no text at all
    batches = list(ModalityLengthGroupedSampler(ml, 8, world_size=2, rank=0))
    assert all(len(b) == 4 for b in batches)
    video_only = ModalityLengthGroupedSampler([("video", 3)] * 5, 4)
    assert sorted({i for b in video_only for i in b}) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kw, words", [(dict(global_batch_size=6, world_size=4), "multiple of the world size"),
                                       (dict(global_batch_size=8, world_size=2, micro_batch_size=3), "divide"),
                                       (dict(global_batch_size=8, rank=1), "rank 1"),
                                       (dict(global_batch_size=8, split="other"), "split")])
def test_bad_arguments(kw, words):
    with pytest.raises(ValueError, match=words):
        ModalityLengthGroupedSampler(ML, **kw)


def test_yield_epoch_keys():
    s = sampler(yield_epoch=True)
    s.set_epoch(3)
    plain = sampler()
    plain.set_epoch(3)
    assert list(s) == [[(i, 3) for i in b] for b in plain]


def test_an_epochs_end_is_the_next_epochs_start():
    """A state taken after the last micro-batch of epoch e says (e + 1, 0), and an old state that says (e, len)
    loads as that too: a resume at an epoch's end never replays the epoch."""
    s = sampler(micro_batch_size=2)
    s.set_epoch(1)
    done = list(s)
    assert s.position == len(s) == len(done)
    state = s.state_dict()
    assert (state["epoch"], state["position"]) == (2, 0)
    assert s.state_dict(position=3, epoch=4)["epoch"] == 4
    nxt = sampler(micro_batch_size=2)
    nxt.set_epoch(2)
    expected = list(nxt)
    for st in (state, dict(state, epoch=1, position=len(done))):
        resumed = sampler(micro_batch_size=2)
        resumed.load_state_dict(st)
        resumed.set_epoch(2)
        assert (resumed.epoch, resumed.position) == (2, 0) and list(resumed) == expected
