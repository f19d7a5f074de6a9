"""Synthetic training batches for the main job and tests: real uint8 frames and token ids, made deterministically
from a seed, so that `merv-fast bench` runs with no dataset on disk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merv_fast.config import ModelConfig

IGNORE_INDEX = -100


@dataclass
class SyntheticBatch:
    frames: torch.Tensor  # uint8 [B, frames_sampled, H, W, 3]
    input_ids: torch.Tensor  # [B, S], BOS first
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]; the first half of the text (the "human" turn) and BOS ignored
    flip: torch.Tensor  # bool [B]

    def to(self, device) -> "SyntheticBatch":
        return SyntheticBatch(*(t.to(device, non_blocking=True) for t in
                                (self.frames, self.input_ids, self.attention_mask, self.labels, self.flip)))


def synthetic_batches(cfg: ModelConfig, batch_size: int, text_tokens: int, count: int, seed: int = 0,
                      frame_hw: tuple[int, int] | None = None) -> list[SyntheticBatch]:
    """`count` batches of smooth moving-gradient videos (not white noise: resize and pooling then see realistic
    spatial correlation) and random text. Frames default to 5:4 of the largest encoder input, so every resize path
    (squash, short side + crop) does real work."""
    g = torch.Generator().manual_seed(seed)
    size = max(e.image_size for e in cfg.encoders)
    h, w = frame_hw or (size * 5 // 4, size * 3 // 2)
    t = cfg.frames_sampled
    ys = torch.linspace(0, 1, h).view(1, 1, h, 1, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, 1, w, 1)
    ts = torch.linspace(0, 1, t).view(1, t, 1, 1, 1)
    vocab = cfg.llm.vocab_size
    batches = []
    for _ in range(count):
        phase = torch.rand(batch_size, 1, 1, 1, 3, generator=g) * 6.28
        wave = torch.sin(6.28 * (xs * 2 + ys * 3 + ts) + phase) * 0.4 + 0.5
        noise = torch.rand(batch_size, t, h, w, 3, generator=g) * 0.2
        frames = ((wave + noise).clamp(0, 1) * 255).to(torch.uint8)
        ids = torch.randint(3, vocab, (batch_size, text_tokens), generator=g)
        ids[:, 0] = 1  # BOS
        labels = ids.clone()
        labels[:, : text_tokens // 2] = IGNORE_INDEX
        batches.append(SyntheticBatch(frames, ids, torch.ones_like(ids), labels,
                                      torch.rand(batch_size, generator=g) < 0.5))
    return batches
