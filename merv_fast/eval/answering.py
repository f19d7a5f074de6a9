"""A random model made to answer multiple choice like a trained one, for tests and benchmarks: after a prompt it
writes an option letter, and after a letter, EOS (as "B</s>").

Two residual-stream channels carry it: every text token's embedding gets +`strength` in channel 0 and each
letter's in channel 1; the LM head reads channel 0 into the letters' logits and channel 1 into EOS's. The last
prompt position (a text token) then prefers the letters, and a letter prefers EOS next. Which letter wins is left
to the rest of the state; a random LLM's last state hardly depends on the prompt (its own token dominates it), so
the choice rarely changes between questions: tests that need per-question differences compare logits.
"""

from __future__ import annotations

import torch

from merv_fast.eval.decide import letter_token_ids


@torch.no_grad()
def bias_toward_letters(model, tokenizer, letters: int = 3, then_eos: bool = True, strength: float = 4.0) -> None:
    """Edit `model.llm` in place: its first generated token is one of the first `letters` option letters, and with
    `then_eos` the token after a letter is EOS."""
    llm = model.llm
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    letter_ids = torch.tensor(letter_token_ids(tokenizer, letters), device=embed.device)
    text_rows = torch.ones(embed.shape[0], dtype=torch.bool, device=embed.device)
    text_rows[letter_ids] = False
    embed[text_rows, 0] += strength
    head[letter_ids, 0] = strength
    if then_eos:
        embed[letter_ids, 1] += strength
        head[tokenizer.eos_token_id, 1] = strength
