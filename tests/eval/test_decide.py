"""The multiple-choice decision from one forward pass vs the release's generation, and batching vs batch size 1."""

import torch

from merv_fast.eval import decide, inputs
from merv_fast.eval.prompts import LETTERS, prompt_for, release_choice
from merv_fast.eval.runner import clip_key
from merv_fast.measure.eval_areas import in_batches, scorers


def test_letter_logits_decide_as_generation_does(answering, mc_scoring):
    model, tokenizer = answering
    items, visual, fast, release = mc_scoring
    with torch.no_grad():
        letters = in_batches(fast, items, visual, 7)  # one forward pass per batch of 7
        generated = in_batches(release, items, visual, 1)  # greedy generation, batch size 1, up to 512 tokens
    letter_ids = decide.letter_token_ids(tokenizer)
    compared = 0
    for item, letter, text in zip(items, letters, generated):
        first = tokenizer.encode(text, add_special_tokens=False)[:1]
        if first and first[0] in letter_ids[:len(item.options)]:  # generation's first token is an option letter
            compared += 1
            assert release_choice(text) == letter.lower(), (item.key, letter, text)
    assert compared >= 20, f"only {compared} of {len(items)} questions compared"
    assert set(letters) == {"A", "B", "C"}, f"the decisions should vary between questions: {letters}"
    assert all(text in LETTERS[:3] for text in generated), "the biased model answers a letter, then EOS"


def test_batched_letter_decisions_equal_batch_size_1(answering, mc_scoring):
    model, tokenizer = answering
    items, visual, fast, _ = mc_scoring
    items = items[:14]
    with torch.no_grad():
        assert in_batches(fast, items, visual, 5) == in_batches(fast, items, visual, 1)
    # The letters' logits row by row: a batch mixes no rows up (every clip gives other logits).
    fmt = model.config.llm.prompt_format
    ids = inputs.tokenize_prompts(tokenizer, [prompt_for(i, fmt) for i in items], 256, has_bos=True)
    tokens = torch.stack([visual[clip_key(i)] for i in items])
    letter_ids, counts = decide.letter_token_ids(tokenizer), [len(i.options) for i in items]
    _, batched = decide.letter_decisions(model, *inputs.left_padded_inputs(model, ids, tokens, tokenizer.pad_token_id),
                                         letter_ids, counts)
    for row in range(len(items)):
        _, alone = decide.letter_decisions(
            model, *inputs.left_padded_inputs(model, ids[row:row + 1], tokens[row:row + 1], tokenizer.pad_token_id),
            letter_ids, counts[row:row + 1])
        torch.testing.assert_close(batched[row, :counts[row]], alone[0], atol=1e-5, rtol=1e-5)
    assert (batched[:, 0] - batched[0, 0]).abs().max() > 1e-4


def test_batched_generation_equals_batch_size_1(rambling, eval_sets):
    model, tokenizer = rambling
    items, visual, fast, single = scorers(model, tokenizer, "open", [eval_sets["openended"]], 5, max_new_tokens=8)
    with torch.no_grad():
        batched, alone = in_batches(fast, items, visual, 5), in_batches(single, items, visual, 1)
    assert batched == alone
    assert len(set(batched)) >= 2 and all(batched)


def test_left_padded_inputs_match_the_training_forward(rambling):
    """Each row of a left-padded batch gives the logits of the plain forward (`language_model_forward`, one prompt,
    no padding), and holds BOS, then the visual tokens, then its text."""
    model, tokenizer = rambling
    prompts = ["In: Why?\nOut:", "In: What is happening in the video?\nOut:", "In: Where are they? A B C\nOut:"]
    ids = inputs.tokenize_prompts(tokenizer, prompts, 256, has_bos=True)
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(3, model.num_visual_tokens, model.llm.config.hidden_size, generator=g)
    embeds, mask, positions = inputs.left_padded_inputs(model, ids, visual, tokenizer.pad_token_id)
    table = model.llm.get_input_embeddings().weight
    letter_ids = decide.letter_token_ids(tokenizer, 5)
    _, batched = decide.letter_decisions(model, embeds, mask, positions, letter_ids, [5, 5, 5])
    for row, p in enumerate(ids):
        pad = embeds.shape[1] - len(p) - visual.shape[1]
        assert mask[row, :pad].sum() == 0 and bool(mask[row, pad:].all())
        assert torch.equal(embeds[row, pad], table[tokenizer.bos_token_id])
        assert torch.equal(embeds[row, pad + 1:pad + 1 + visual.shape[1]], visual[row])
        assert torch.equal(positions[row, pad:], torch.arange(len(p) + visual.shape[1]))
        with torch.no_grad():
            plain = model.language_model_forward(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                                 visual=visual[row:row + 1]).logits[0, -1]
        torch.testing.assert_close(batched[row], plain[letter_ids], atol=1e-5, rtol=1e-5)


def test_generation_stops_at_eos_per_row(answering):
    model, tokenizer = answering
    ids = inputs.tokenize_prompts(tokenizer, ["In: Why?\nOut:", "In: Where are they?\nOut:"], 256, has_bos=True)
    visual = torch.zeros(2, model.num_visual_tokens, model.llm.config.hidden_size)
    tokens = decide.generate_tokens(model, *inputs.left_padded_inputs(model, ids, visual, tokenizer.pad_token_id),
                                    eos_id=tokenizer.eos_token_id, max_new_tokens=50)
    letter_ids = decide.letter_token_ids(tokenizer, 3)
    assert all(len(t) == 2 and t[0] in letter_ids and t[1] == tokenizer.eos_token_id for t in tokens)
