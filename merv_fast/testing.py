"""Test helpers shared across the project: a tiny Llama tokenizer built entirely in-process (no downloads)."""

from __future__ import annotations

import functools
import json
import string

# Text the tiny tokenizer is trained on: the words our tests and prompt formats use, so that they come out as whole
# tokens and token counts stay small. Anything else still tokenizes, character by character.
_CORPUS = [
    "In: What is happening in the video?\nOut: A man is playing a guitar on a stage.",
    "USER: Describe the video in detail. ASSISTANT: A dog runs across the park and catches a red ball.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful language and vision assistant.",
    "You are able to understand the visual content that the user provides,",
    "and assist the user with a variety of tasks using natural language.",
    "What color is the car? The car is blue. Why does the woman smile? She is happy.",
    "How many people are there? There are three people. Where are they? They are in a kitchen.",
    "Select the correct answer from the following options. Write your answer as only one of A, B, C and nothing else.",
    "<video> <image> system user assistant Yes No True False",
]
# Single tokens the evaluation code relies on (the release asserts these encode to exactly one token).
_REQUIRED_WORDS = ["True", "False", "Yes", "No"] + list(string.ascii_uppercase)


def _train_vocab(words: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]  # Llama's ids: unk=0, bos=1, eos=2
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Train on whitespace-split words (split=True) so no merge crosses a word boundary, as in SentencePiece.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    alphabet = list(string.printable.strip()) + ["\n", "\u2581"]  # any ASCII text tokenizes without <unk>
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  min_frequency=1, show_progress=False)
    # Repeating the required words makes their merges the most frequent ones, so they are learned first.
    corpus = _CORPUS + [" ".join(words)] * 50
    bpe.train_from_iterator(corpus, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    # Older `tokenizers` serialise a merge as "a b", newer ones as ["a", "b"].
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    return dict(model_json["vocab"]), merges


@functools.lru_cache(maxsize=8)
def _cached(words: tuple[str, ...], vocab_size: int):
    return _train_vocab(words, vocab_size)


def tiny_llama_tokenizer(vocab_words: list[str] | None = None, vocab_size: int = 400):
    """A real `LlamaTokenizer` (transformers' fast, tokenizers-backed class) with a vocabulary trained in-process.

    Behaves like Llama-2's: `<unk>`=0, `<s>`=1, `</s>`=2; BOS prepended when `add_special_tokens=True`; `</s>` inside
    text is recognised as the EOS token; SentencePiece-style "▁" word prefixes. `vocab_words` are extra words that
    must come out as single tokens (the eval letters A-Z, True/False/Yes/No always do). `vocab_size` stays below the
    tiny preset's 500 so that the model's embedding table covers every id.
    """
    from transformers import LlamaTokenizer

    words = tuple(dict.fromkeys(_REQUIRED_WORDS + list(vocab_words or [])))
    vocab, merges = _cached(words, vocab_size)
    tokenizer = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, model_max_length=2048,
                               padding_side="right")
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tiny tokenizer: {word!r} is {len(ids)} tokens; raise vocab_size ({vocab_size})")
    return tokenizer
