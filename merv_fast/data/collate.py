"""Samples -> a padded batch, as the release's `PaddedCollatorForLanguageModeling` (right padding, labels padded with
IGNORE_INDEX), keeping the frames as decoded uint8 so that the fused preprocessing reads each frame once.

One difference: the release derived `attention_mask` from `input_ids != pad_token_id`; here it comes from the sample
lengths, which is the same whenever the pad token never occurs inside a text (true with the added pad token) and
right where it would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from merv_fast.data.dataset import BadSample, Sample
from merv_fast.data.prompts import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, S], right-padded with pad_token_id
    attention_mask: torch.Tensor  # bool [B, S]
    labels: torch.Tensor  # long [B, S], padding IGNORE_INDEX
    # uint8 [B, T, H, W, 3] (T = 32 for videos, 1 for images) when every sample has the same frame shape; otherwise
    # a list of per-sample [T, H, W, 3] tensors (sources of different sizes: preprocess per sample); None: text-only.
    frames: torch.Tensor | list[torch.Tensor] | None
    is_image: torch.Tensor  # bool [B]
    flip: torch.Tensor  # bool [B]: LanguageBind's horizontal flip per sample
    kind: str  # "video" | "image" | "text" | "mixed" (only with the sampler's split="release")
    indices: list[int] = field(default_factory=list)  # dataset positions loaded
    ids: list[str] = field(default_factory=list)
    bad_samples: list[BadSample] = field(default_factory=list)  # failures replaced while loading this batch

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = True) -> "Batch":
        def move(t):
            return t.to(device, non_blocking=non_blocking) if t is not None else None

        frames = [move(f) for f in self.frames] if isinstance(self.frames, list) else move(self.frames)
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), frames,
                     move(self.is_image), move(self.flip), self.kind, self.indices, self.ids, self.bad_samples)


def _as_tensor(frames) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames


def collate(samples: Sequence[Sample], pad_token_id: int, max_length: int | None = None) -> Batch:
    """Pad to the longest sample on the right (then cut at `max_length` if given, as the release's collator)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer needs a pad token (the release adds '<PAD>')")
    longest = max(len(s.input_ids) for s in samples)
    width = longest if max_length is None else min(longest, max_length)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        if len(s.input_ids) != len(s.labels):
            raise ValueError(f"sample {s.index} (id {s.id!r}): {len(s.input_ids)} input ids but {len(s.labels)} labels")
        n = min(len(s.input_ids), width)
        input_ids[row, :n] = torch.tensor(s.input_ids[:n], dtype=torch.long)
        labels[row, :n] = torch.tensor(s.labels[:n], dtype=torch.long)
        attention_mask[row, :n] = True

    kinds = {s.kind for s in samples}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    if kind == "mixed" and any(s.kind == "text" for s in samples):
        # Neither the release nor this sampler ever mixes text-only with visual samples in a batch.
        raise ValueError(f"a batch mixes text-only and visual samples ({sorted({s.kind for s in samples})})")
    frames = None
    if kind != "text":
        per_sample = [_as_tensor(s.frames) for s in samples]
        same_shape = all(f.shape == per_sample[0].shape for f in per_sample)
        frames = torch.stack(per_sample) if same_shape else per_sample
    return Batch(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, frames=frames,
        is_image=torch.tensor([s.kind == "image" for s in samples], dtype=torch.bool),
        flip=torch.tensor([bool(s.flip) for s in samples], dtype=torch.bool), kind=kind,
        indices=[s.index for s in samples], ids=[s.id for s in samples],
        bad_samples=[b for s in samples for b in s.bad_samples],
    )
