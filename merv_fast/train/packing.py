"""Multimodal sequence packing: a micro-batch's spliced samples (visual tokens after BOS, then text), padding dropped,
laid into as few rows as first-fit-decreasing finds under a token budget.

Per sample nothing changes: its position ids restart at 0, it attends only to itself (the row's `Documents`: a dense
block-diagonal causal mask for sdpa, a BlockMask for flex, cu_seqlens for flash-attn and xformers), and its labels
shift within itself: each sample's first label becomes IGNORE, so the loss's shift-by-one over the row never makes a
sample's last token predict the next sample's first. Padding is dropped, but the unpacked batch's padding was never
supervised, and nothing predicts a sample's first token, so the supervised targets (and the loss per target) are
exactly those of unpacked training. A row shorter than the longest is padded at its end, as one more segment that
attends only to itself and is never supervised.

A sample longer than the budget gets a row of its own (samples are never split). The default budget, 16384 tokens,
takes a whole stage-2 micro-batch of 8 (1024 visual + 50-600 text tokens each, about 11k tokens) into one row, so
no row is padded: every backend attends per sample whatever the row's length (flash_attn and xformers by their
varlen layouts, flex by its block mask, sdpa as `sdpa_packed`, one call per sample: TrainModule installs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merv_fast.model.attention import Documents, sample_lengths
from merv_fast.model.llm import IGNORE_INDEX

DEFAULT_PACK_BUDGET = 16384


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the first row with room (a new row when none has)."""
    if budget < 1:
        raise ValueError(f"pack_budget must be positive, got {budget}")
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, total in enumerate(used):
            if total + lengths[i] <= budget:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


@dataclass
class Packed:
    embeds: torch.Tensor  # [rows, width, D]
    labels: torch.Tensor | None  # [rows, width], each sample's first label IGNORE
    position_ids: torch.Tensor  # [rows, width], restarting at 0 per sample
    documents: Documents
    rows: list[list[int]]  # the sample indices of each row, in order


def pack(embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, budget: int) -> Packed:
    """Pack right-padded spliced samples (embeds [B, S, D], mask [B, S], labels [B, S]) into rows of <= `budget`
    tokens (or one over-long sample). One gather: differentiable back to `embeds`."""
    batch, width, dim = embeds.shape
    lengths = sample_lengths(attention_mask)
    rows = first_fit_decreasing(lengths, budget)
    row_width = max(sum(lengths[i] for i in row) for row in rows)
    pad = batch * width  # index of an appended zero row: what padding positions gather
    index, positions, first, segments = [], [], [], []
    for row in rows:
        row_index, row_segments = [], []
        for i in row:
            first.append(len(index) + len(row_index))
            row_index.extend(range(i * width, i * width + lengths[i]))
            positions.extend(range(lengths[i]))
            row_segments.append(lengths[i])
        tail = row_width - len(row_index)
        if tail:
            row_index.extend([pad] * tail)
            positions.extend(range(tail))
            row_segments.append(tail)
        index.extend(row_index)
        segments.append(row_segments)
    device = embeds.device
    index_t = torch.tensor(index, device=device)
    flat = torch.cat([embeds.reshape(pad, dim), embeds.new_zeros(1, dim)])
    packed_embeds = flat[index_t].view(len(rows), row_width, dim)
    packed_labels = None
    if labels is not None:
        flat_labels = torch.cat([labels.reshape(pad), labels.new_full((1,), IGNORE_INDEX)])
        packed_labels = flat_labels[index_t]
        packed_labels[torch.tensor(first, device=device)] = IGNORE_INDEX
        packed_labels = packed_labels.view(len(rows), row_width)
    position_ids = torch.tensor(positions, device=device).view(len(rows), row_width)
    return Packed(packed_embeds, packed_labels, position_ids, Documents(segments, device), rows)
