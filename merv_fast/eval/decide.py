"""Answers from the LLM: the multiple-choice decision from the option letters' logits after ONE forward pass, and
greedy generation with a KV cache (the release's `generate(do_sample=False)`: argmax each step, stop at EOS).

The letter decision equals generation's whenever generation's first token is an option letter: both take the
argmax of the same logits (the next token after the prompt), one over the option letters, one over the vocabulary.
Inputs come from `inputs.left_padded_inputs` (every prompt ends at the last position).
"""

from __future__ import annotations

import functools
import inspect

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


@torch.no_grad()
def greedy_generate(model, embeds, mask, positions, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens per row, up to `max_new_tokens`, each row ending at its first EOS (included). One prefill over
    the whole batch, then one cached step per new token for every row still running."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    llm = model.llm
    logits, cache = _next_token_logits(llm, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    batch = embeds.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    running = [True] * batch
    positions = positions[:, -1:]
    for step in range(max_new_tokens):
        chosen = logits.argmax(dim=-1)
        for row, token in enumerate(chosen.tolist()):
            if running[row]:
                tokens[row].append(token)
                running[row] = token != eos_id
        if not any(running) or step == max_new_tokens - 1:
            break
        # Finished rows keep stepping (their tokens are dropped): the batch stays one rectangular cache.
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions + 1
        logits, cache = _next_token_logits(llm, cache, input_ids=chosen[:, None], attention_mask=mask,
                                           position_ids=positions)
    return tokens
