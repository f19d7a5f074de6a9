"""Test helpers shared across the project: tiny tokenizers of each LLM family (Llama-2's SentencePiece-style one,
Llama-3's and Qwen2.5's byte-level ones), built entirely in-process (no downloads)."""

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


# Byte-level families: the special tokens each family's tokenizer.json declares (the names the release's prompt
# builders and pad handling use), the BOS the tokenizer prepends (None: none), its EOS and its own pad token.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_byte_level(words: tuple[str, ...], vocab_size: int, specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS + list(words) * 50, trainer=trainer)  # each word alone: no leading space
    return bpe


@functools.lru_cache(maxsize=8)
def _cached_byte_level(words: tuple[str, ...], vocab_size: int, specials: tuple[str, ...]) -> str:
    return _train_byte_level(words, vocab_size, specials).to_str()


def tiny_byte_level_tokenizer(family: str, vocab_words: list[str] | None = None, vocab_size: int = 460):
    """A real transformers fast tokenizer of the Llama-3 (`family="llama3"`) or Qwen2.5 (`"qwen2"`) kind: byte-level
    BPE trained in-process, the family's special tokens, Llama-3's `<|begin_of_text|>` BOS prepended with
    `add_special_tokens=True` and Qwen's no BOS at all, EOS `<|end_of_text|>` / `<|im_end|>`. Saved with
    `save_pretrained`, it loads back through `AutoTokenizer` like the real ones."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"llama3": LLAMA3_SPECIALS, "qwen2": QWEN2_SPECIALS}[family]
    words = tuple(dict.fromkeys(_REQUIRED_WORDS + list(vocab_words or [])))
    backend = Tokenizer.from_str(_cached_byte_level(words, vocab_size, tuple(specials)))
    if family == "llama3":
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
        kwargs = dict(bos_token=bos, eos_token="<|end_of_text|>")
    else:
        kwargs = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=2048, padding_side="right",
                                        additional_special_tokens=specials, **kwargs)
    for word in words:
        if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
            raise ValueError(f"tiny {family} tokenizer: {word!r} is not one token; raise vocab_size ({vocab_size})")
    return tokenizer


def tokenizer_family(backbone: str) -> str:
    """Which tokenizer a release backbone id uses: "llama2" (SentencePiece: Llama-2, Vicuna), "llama3", "qwen2"."""
    base = backbone.removeprefix("tiny-")
    return "qwen2" if base.startswith("qwen") else "llama3" if base.startswith("llama3") else "llama2"


def tiny_tokenizer_for(backbone: str, vocab_words: list[str] | None = None, vocab_size: int = 400):
    """The in-process tiny tokenizer of `backbone`'s family (no pad token set: `merv_fast.model.llm.set_pad_token`)."""
    family = tokenizer_family(backbone)
    if family == "llama2":
        return tiny_llama_tokenizer(vocab_words, vocab_size)
    return tiny_byte_level_tokenizer(family, vocab_words, vocab_size + 60)  # byte-level needs its 256 bytes first
