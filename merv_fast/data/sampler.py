"""Single-modality, length-grouped, rank-sharded batches with an exact-resume state.

What it reproduces: the MERV release's `SplitModalitySampler` (merv/util/batching_utils.py, Prismatic's, itself
LLaVA's grouping with HF Trainer's per-rank allocation). Per epoch, with a torch.Generator seeded `seed + epoch`:
1. each modality group's positions are permuted (`torch.randperm`, groups in a fixed order) and cut into global batches
   of `global_batch_size`; a short last batch is filled with the first batch's leading samples;
2. each global batch is sorted by length (descending, stable) and dealt greedily into `world_size` equal buckets,
   each new sample going to the bucket with the smallest total length (the release's `reindex_batch`), so that
   every rank's share of a global batch has similar lengths;
3. all groups' global batches are permuted together (one more `randperm`), and the batch holding the longest
   sample (text length + 576 for a visual sample, the release's constant) is swapped to the front (an OOM shows
   at step 1);
4. rank r takes the r-th contiguous slice of every global batch.
With `split="release"` the groups are the release's two, multimodal (images and videos together) and text-only, and
the lengths the release's word counts (`VideoLLaVADataset.modality_lengths("words")`): the order of positions is then
the release's for the same seed, rank and world size.

Where it differs (improvements, all deliberate):
- `split="kind"` (default) keeps videos, images and text-only apart (spec section 6: batches are single-modality),
  so an image batch can encode one frame and tile it, and a video batch never mixes in images;
- it yields micro-batches (lists of positions) for `batch_sampler=`; a global batch is cut into `world_size` rank
  shares and each share into `micro_batch_size` pieces, so gradient accumulation never changes which samples a rank
  sees, and every rank gets the same number of steps (the release's `__len__` miscounted with two groups);
- a group smaller than one global batch is filled by cycling (the release could leave it short and fail), and an
  empty group (e.g. no text-only entries, or no multimodal ones) is fine (the release failed with no multimodal);
- `state_dict()` / `load_state_dict()` hold (seed, epoch, position) for exact resume, also onto another world size at
  a global-batch boundary (the global batches' contents do not depend on the world size, only the split does).
Everything depends on (seed, epoch) alone, never on a worker's or the global RNG state.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

GROUP_ORDER = ("video", "image", "text")  # randperm call order for split="kind" (fixed: part of the contract)
RELEASE_VISUAL_LENGTH = 24 * 24  # the release's `_n_patches` added to a visual sample's length for the longest swap


def _group_of(kind, split: str) -> str:
    if isinstance(kind, bool):  # the release's (is_multimodal, length) pairs
        kind = "video" if kind else "text"
    if kind not in GROUP_ORDER:
        raise ValueError(f"unknown modality {kind!r}; expected one of {GROUP_ORDER} or a bool")
    if split == "release":
        return "multimodal" if kind != "text" else "text"
    return kind


def _deal_into_buckets(batch: list[int], lengths: Sequence[int], n_buckets: int) -> list[list[int]]:
    """The release's `reindex_batch`: `batch` is sorted by length, descending; each sample goes to the bucket with the
    smallest total length (first such bucket on ties), a full bucket taking no more."""
    per_bucket = len(batch) // n_buckets
    buckets: list[list[int]] = [[] for _ in range(n_buckets)]
    totals: list[float] = [0] * n_buckets
    for idx in batch:
        b = totals.index(min(totals))
        buckets[b].append(idx)
        totals[b] += lengths[idx]
        if len(buckets[b]) == per_bucket:
            totals[b] = float("inf")
    return buckets


class ModalityLengthGroupedSampler:
    """Batch sampler: iterating yields this rank's micro-batches (lists of dataset positions) for one epoch.

    modality_lengths: (kind, length) per dataset position, kind in "video" | "image" | "text" (or the release's bool
    is_multimodal); e.g. `dataset.modality_lengths()`.
    global_batch_size: samples per optimizer step over all ranks; must divide into world_size equal shares and each
    share into micro-batches of `micro_batch_size` (default: the whole share, i.e. no accumulation).
    split: "kind" (video / image / text batches) or "release" (multimodal / text, the release's grouping).
    yield_epoch: yield `(position, epoch)` keys instead of positions, for `VideoLLaVADataset` under persistent
    DataLoader workers (their copy of the dataset never sees `set_epoch`, so the key carries the epoch).
    """

    def __init__(self, modality_lengths: Sequence[tuple], global_batch_size: int, world_size: int = 1,
                 rank: int = 0, micro_batch_size: int | None = None, seed: int = 0, split: str = "kind",
                 yield_epoch: bool = False):
        if split not in ("kind", "release"):
            raise ValueError(f"split must be 'kind' or 'release', got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the world size "
                             f"{world_size}")
        per_rank = global_batch_size // world_size
        micro = per_rank if micro_batch_size is None else micro_batch_size
        if micro < 1 or per_rank % micro:
            raise ValueError(f"micro_batch_size {micro} must divide the per-rank share {per_rank} of the global batch")
        if len(modality_lengths) == 0:
            raise ValueError("the dataset is empty")
        self.groups = [_group_of(kind, split) for kind, _ in modality_lengths]
        self.lengths = [int(length) for _, length in modality_lengths]
        self.visual = [g != "text" for g in self.groups]
        self.global_batch_size, self.world_size, self.rank = global_batch_size, world_size, rank
        self.per_rank, self.micro_batch_size = per_rank, micro
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self.split = split
        self.yield_epoch = yield_epoch
        self._cache: tuple[int, int, list[list[int]]] | None = None  # (seed, epoch, global batches)

    # ------------------------------------------------------------------------------------------- the order
    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All global batches of an epoch, in order; each lists its rank shares one after another."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[:2] == (self.seed, epoch):
            return self._cache[2]
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)  # the release's seeding (so seed 1 epoch 0 == seed 0 epoch 1, as there)
        order = ("multimodal", "text") if self.split == "release" else GROUP_ORDER
        gbs = self.global_batch_size
        merged: list[list[int]] = []
        for group in order:
            members = [i for i, grp in enumerate(self.groups) if grp == group]
            perm = torch.randperm(len(members), generator=g).tolist()  # drawn even when empty, as the release does
            if not members:
                continue
            lengths = [self.lengths[i] for i in members]
            chunks = [perm[i:i + gbs] for i in range(0, len(perm), gbs)]
            last, first = chunks[-1], list(chunks[0])
            while len(last) < gbs:  # fill from the first batch (cycling only when the group is smaller than a batch)
                last.extend(first[:gbs - len(last)])
            for chunk in chunks:
                ranked = sorted(chunk, key=lambda i: lengths[i], reverse=True)
                shares = _deal_into_buckets(ranked, lengths, self.world_size)
                merged.append([members[i] for share in shares for i in share])
        mix = torch.randperm(len(merged), generator=g).tolist()
        batches = [merged[i] for i in mix]
        longest = [max(self.lengths[i] + (RELEASE_VISUAL_LENGTH if self.visual[i] else 0) for i in b) for b in batches]
        top = longest.index(max(longest))  # first maximum, as np.argmax
        batches[0], batches[top] = batches[top], batches[0]
        self._cache = (self.seed, epoch, batches)
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's micro-batches for an epoch, in order."""
        out = []
        lo = self.rank * self.per_rank
        for batch in self.global_batches(epoch):
            share = batch[lo:lo + self.per_rank]
            out.extend(share[i:i + self.micro_batch_size] for i in range(0, self.per_rank, self.micro_batch_size))
        return out

    @property
    def micro_batches_per_global_batch(self) -> int:
        return self.per_rank // self.micro_batch_size

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank)."""
        return self.num_global_batches() * self.micro_batches_per_global_batch

    def num_global_batches(self) -> int:
        gbs = self.global_batch_size
        sizes: dict[str, int] = {}
        for grp in self.groups:
            sizes[grp] = sizes.get(grp, 0) + 1
        return sum(-(-n // gbs) for n in sizes.values())

    def __iter__(self) -> Iterator[list]:
        """Continues from `position` (0 after `set_epoch` to a new epoch, or where a loaded state left off). A pass that
        starts at the end of the epoch starts the same epoch again (call `set_epoch` between epochs, as with torch's
        DistributedSampler); a state never says so: `state_dict` states an epoch's end as the next epoch's start."""
        batches = self.rank_batches()
        if self.position >= len(batches):
            self.position = 0
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield [(i, self.epoch) for i in batch] if self.yield_epoch else list(batch)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning; setting the current epoch again keeps the position (so that a
        trainer calling set_epoch after a resume does not lose it)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    # ------------------------------------------------------------------------------------------- exact resume
    def state_dict(self, position: int | None = None, epoch: int | None = None) -> dict:
        """Everything needed to continue with exactly the next batch.

        `position` is the number of micro-batches of epoch `epoch` (default: the current one) already consumed; by
        default the number this sampler has handed out. Under a DataLoader that prefetches, pass the number the
        training loop has actually consumed (handed out counts the prefetched batches too). A whole epoch consumed
        is stated as the next epoch's start."""
        epoch = self.epoch if epoch is None else int(epoch)
        position = self.position if position is None else int(position)
        if position >= len(self):
            epoch, position = epoch + 1, 0
        return {
            "seed": self.seed, "epoch": epoch, "position": position,
            "global_batch_size": self.global_batch_size, "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size, "split": self.split, "num_samples": len(self.lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The dataset, global batch size and split must be the same; the world size
        and micro-batch size may change when the state is at a global-batch boundary (as a step boundary is)."""
        for key, mine in (("num_samples", len(self.lengths)), ("global_batch_size", self.global_batch_size),
                          ("split", self.split)):
            if state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {mine!r}: "
                                 f"the batch order would differ")
        position = int(state["position"])
        if (state["world_size"], state["micro_batch_size"]) != (self.world_size, self.micro_batch_size):
            old_per_global = (state["global_batch_size"] // state["world_size"]) // state["micro_batch_size"]
            if position % old_per_global:
                raise ValueError(f"sampler state is {position % old_per_global} micro-batches into a global batch; "
                                 f"it can move to another world size or micro-batch size only at a global-batch "
                                 f"boundary")
            position = position // old_per_global * self.micro_batches_per_global_batch
        epoch = int(state["epoch"])
        if position >= len(self):  # a state taken at an epoch's end (as older checkpoints hold it): the next epoch
            epoch, position = epoch + 1, 0
        self.seed, self.epoch, self.position = int(state["seed"]), epoch, position
        self._cache = None
