"""Answers from the LLM: the multiple-choice decision from the option letters' logits after ONE forward pass, and
generation with a KV cache: greedy (the release's `generate(do_sample=False)`: argmax each step, stop at EOS) or
sampled.

The letter decision equals generation's whenever generation's first token is an option letter: both take the
argmax of the same logits (the next token after the prompt), one over the option letters, one over the vocabulary.
Inputs come from `inputs.left_padded_inputs` (every prompt ends at the last position).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from merv_fast.eval.prompts import LETTERS


def letter_token_ids(tokenizer, count: int = len(LETTERS)) -> list[int]:
    """The token of each option letter as the answer's first token (`encode("B")`, as the release's `string2idx`)."""
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer encodes the option letter {letter!r} as {len(encoded)} tokens "
                             f"{encoded}; letter scoring needs one token per letter")
        ids.append(encoded[0])
    return ids


@functools.lru_cache(maxsize=8)
def _argument_names(llm_class: type) -> tuple[str, str | None]:
    """(the KV cache's keyword, the keep-only-the-last-logits keyword or None): transformers renamed both over time
    (`past_key_values` -> `cache` in 5.x; `num_logits_to_keep` -> `logits_to_keep`); any machine may run either."""
    params = inspect.signature(llm_class.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def _next_token_logits(llm, cache=None, **inputs):
    """Logits [B, vocab] (fp32) at the last position (the only one the LM head computes), and the KV cache."""
    cache_name, keep_name = _argument_names(type(llm))
    keep = {keep_name: 1} if keep_name else {}
    out = llm(**inputs, use_cache=True, **keep, **{cache_name: cache})
    return out.logits[:, -1].float(), getattr(out, cache_name)


@torch.no_grad()
def letter_decisions(model, embeds, mask, positions, letter_ids: list[int], option_counts: list[int]):
    """(chosen option index per row, the letters' logits [B, max options]) from one forward pass."""
    logits, _ = _next_token_logits(model.llm, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    width = max(option_counts)
    letters = logits[:, torch.tensor(letter_ids[:width], device=logits.device)]
    allowed = torch.arange(width, device=logits.device)[None, :] < torch.tensor(option_counts,
                                                                                  device=logits.device)[:, None]
    letters = letters.masked_fill(~allowed, float("-inf"))
    return letters.argmax(dim=-1).tolist(), letters


@dataclass(frozen=True)
class Sampling:
    """How each new token is picked: the argmax (greedy, the default and the release's evaluation), or with
    `do_sample` drawn from the softmax of logits / temperature, cut to the `top_k` most likely tokens and to the
    smallest set whose probability reaches `top_p`, as transformers' `generate` does (its defaults: top_k 50,
    top_p 1). `seed` makes draws repeatable (None: torch's global generator). Beam search is not offered."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 50
    seed: int | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token per row from fp32 logits [B, vocab]."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1)  # ascending: the tail to cut comes first
            tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            tail[:, -1] = False  # the most likely token always stays
            logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


GREEDY = Sampling()


@torch.no_grad()
def generate_tokens(model, embeds, mask, positions, eos_id: int, max_new_tokens: int, sampling: Sampling = GREEDY,
                    on_step: Callable[[list[list[int]], list[bool]], None] | None = None) -> list[list[int]]:
    """New tokens per row, up to `max_new_tokens`, each row ending at its first EOS (included). One prefill over
    the whole batch, then one cached step per new token for every row still running. `on_step(tokens, running)`
    sees every row's tokens so far after each step (streaming). The one generation loop of the package: `merv-fast
    eval` (greedy) and `VideoLM.generate` both run it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    llm = model.llm
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(sampling.seed)
    logits, cache = _next_token_logits(llm, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    batch = embeds.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    running = [True] * batch
    positions = positions[:, -1:]
    for step in range(max_new_tokens):
        chosen = sampling.pick(logits, generator)
        for row, token in enumerate(chosen.tolist()):
            if running[row]:
                tokens[row].append(token)
                running[row] = token != eos_id
        if on_step is not None:
            on_step(tokens, running)
        if not any(running) or step == max_new_tokens - 1:
            break
        # Finished rows keep stepping (their tokens are dropped): the batch stays one rectangular cache.
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions + 1
        logits, cache = _next_token_logits(llm, cache, input_ids=chosen[:, None], attention_mask=mask,
                                           position_ids=positions)
    return tokens
