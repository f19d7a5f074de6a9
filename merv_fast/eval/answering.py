"""A random model made to answer multiple choice like a trained one, for tests and benchmarks: after a prompt it
writes an option letter, and after a letter, EOS (as "B</s>").

Two residual-stream channels carry it: every text token's embedding gets +`strength` in channel 0 and each
letter's in channel 1; the LM head reads channel 0 into the letters' logits and channel 1 into EOS's. The last
prompt position (a text token) then prefers the letters, and a letter prefers EOS next. Which letter wins is left
to the rest of the state; a random LLM's last state hardly depends on the prompt (its own token dominates it), so
on its own the choice rarely changes between questions. `center_letters` fixes that: it removes from the letters'
head rows what the answer states of sample questions share, so that what differs between questions decides.
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


@torch.no_grad()
def answer_states(answerer, items, visual: dict) -> torch.Tensor:
    """[N, D]: the LLM's final hidden states (the LM head's input) at the answer position of each question, from
    one letter-scoring pass of `answerer` (a `merv_fast.eval.runner.Answerer` in letters mode) over `items`."""
    seen = []
    head = answerer.model.llm.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        answerer.predict(items, visual)
    finally:
        hook.remove()
    return seen[-1][:, -1].float()


@torch.no_grad()
def center_letters(model, tokenizer, states: torch.Tensor, letters: int = 3) -> None:
    """Make WHICH letter wins depend on the question and the video: each letter's head row loses its component
    along the mean answer state `states.mean(0)` and gets the letters' common one instead. At the mean state every
    letter then scores the same (still far above every other token), so the choice is decided by how this
    question's state differs from the mean. Call after `bias_toward_letters`, with `answer_states` of sample
    questions (the visual tokens do not depend on the head, so they stay valid)."""
    from merv_fast.eval.decide import letter_token_ids

    head = model.llm.get_output_embeddings().weight
    ids = torch.tensor(letter_token_ids(tokenizer, letters), device=head.device)
    mean = states.mean(0).to(head.device)
    unit = mean / mean.norm()
    rows = head[ids].float()
    along = rows @ unit
    head[ids] = (rows - along[:, None] * unit + along.mean() * unit).to(head.dtype)
