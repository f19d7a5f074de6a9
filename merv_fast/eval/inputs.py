"""What the LLM sees at evaluation: each video's visual tokens (computed once per video) and a batch of prompts,
left-padded, with the visual tokens right after BOS.

Batching puts prompts of different lengths side by side. The visual tokens are spliced after BOS with the
training code's splice (on right-padded text, where BOS is at position 0 of every row), then each row is rotated so
that its padding comes first: every prompt then ends at the last position, where one forward pass reads the answer's
first token and where generation appends. Position ids count real tokens only, so each row sees exactly the
positions it would see alone (batch size 1, no padding: the release's evaluation).
"""

from __future__ import annotations

import zlib

import torch

from merv_fast.data.dataset import counter_hash
from merv_fast.data.preprocess import preprocess_batch
from merv_fast.model.llm import splice_visual_tokens

_STREAM_EVAL_FLIP = 3  # apart from the dataset's flip / replacement streams


def video_flip(seed: int, video_key: str) -> bool:
    """LanguageBind's p = 0.5 horizontal flip, which the release applies at evaluation too: drawn per video (every
    question of a video sees the same tokens), from (seed, video) only. The key is the video's file (or frame
    folder) name, so that `merv-fast eval` and `VideoLM.generate` see the same tokens for the same video."""
    return bool(counter_hash(seed, zlib.crc32(video_key.encode()), _STREAM_EVAL_FLIP) & 1)


@torch.no_grad()
def visual_tokens(model, frames: list[torch.Tensor], flips: list[bool]) -> torch.Tensor:
    """Decoded videos (uint8 [T, H, W, 3] each, any sizes) -> their visual tokens [N, V, D] in one batch."""
    device = next(model.llm.parameters()).device
    dtype = next(model.encoders.parameters()).dtype
    frames = [f.to(device) for f in frames]
    flip = torch.tensor(flips, dtype=torch.bool, device=device)
    pixels = preprocess_batch(frames, model.config.encoders, model.config.frames_sampled, flip=flip,
                              dtype=dtype)
    return model.visual_tokens(model.encode(pixels))


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, has_bos: bool) -> list[list[int]]:
    """Each prompt as the release tokenises it: BOS added, truncated at the LLM's text length."""
    ids = [list(tokenizer(p, add_special_tokens=True).input_ids)[:max_length] for p in prompts]
    if has_bos:
        for row, text in zip(ids, prompts):
            if not row or row[0] != tokenizer.bos_token_id:
                raise ValueError(f"the tokenizer did not start {text[:40]!r} with BOS (id {tokenizer.bos_token_id}); "
                                 "the visual tokens go right after it (set llm.has_bos=false for a BOS-less LLM)")
    return ids


def left_padded_inputs(model, prompt_ids: list[list[int]], visual: torch.Tensor, pad_id: int):
    """(inputs_embeds [B, S, D], attention_mask [B, S], position_ids [B, S]) for prompts [B] and their visual
    tokens [B, V, D]: BOS, visual tokens, the rest of the prompt, padding on the left."""
    embedding = model.llm.get_input_embeddings()
    device = embedding.weight.device
    batch, longest = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[row, :len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = embedding(ids)
    prefix = 1 if model.config.llm.has_bos else 0
    embeds, mask, _ = splice_visual_tokens(embeds, mask, None, visual.to(embeds.dtype), prefix_length=prefix)
    length = mask.shape[1]
    shift = length - mask.sum(dim=1, keepdim=True)  # padding per row
    index = (torch.arange(length, device=device)[None, :] - shift) % length
    embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    mask = mask.gather(1, index)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return embeds, mask, positions
