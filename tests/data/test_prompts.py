"""Prompt formats against the MERV release's builders, and conversation tokenisation (labels, BOS, truncation)."""

import pytest

from merv_fast.config import PROMPT_FORMATS
from merv_fast.data.prompts import (
    IGNORE_INDEX,
    MERV_CHAT_SYSTEM_PROMPT,
    build_prompt,
    tokenize_caption,
    tokenize_conversation,
    wrap_turns,
)
from merv_fast.testing import tiny_llama_tokenizer

CHAT_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

# Three exchanges exercising every cleaning rule: `<video>` (kept), `<image>` (stripped by the Prismatic-style
# builders), surrounding whitespace, and an empty answer.
CONVERSATION = [
    {"from": "human", "value": "<video>\nWhat is the man doing?"},
    {"from": "gpt", "value": "He is playing a guitar."},
    {"from": "human", "value": "  What color is it? <image>"},
    {"from": "gpt", "value": "It is blue."},
    {"from": "human", "value": "Why?"},
    {"from": "gpt", "value": ""},
]

# The release's turn strings, written out from its builder definitions (after the per-turn `.rstrip()`).
EXPECTED_TURNS = {
    "llama2-base": [
        "In: <video>\nWhat is the man doing?\nOut:",
        "He is playing a guitar.</s>",
        "In: What color is it?\nOut:",
        "It is blue.</s>",
        "In: Why?\nOut:",
        " </s>",
    ],
    "vicuna-v15": [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <video>\nWhat is the man doing? ASSISTANT:",
        "He is playing a guitar.</s>",
        "USER: What color is it? ASSISTANT:",
        "It is blue.</s>",
        "USER: Why? ASSISTANT:",
        " </s>",
    ],
    "llama3-chat": [
        "<|start_header_id|>user<|end_header_id|>\n\n<video>\nWhat is the man doing?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>",
        "He is playing a guitar.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n  What color is it? <image><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>",
        "It is blue.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
        "<|eot_id|>",
    ],
    "llama2-chat": [
        "<s>[INST] <<SYS>\n" + MERV_CHAT_SYSTEM_PROMPT + "\n<</SYS>>\n\n<video>\nWhat is the man doing? [/INST]",
        "He is playing a guitar.</s>",
        "<s>[INST] What color is it? [/INST]",
        "It is blue.</s>",
        "<s>[INST] Why? [/INST]",
        " </s>",
    ],
    "qwen25-chat": [
        "<|im_start|>user\n<video>\nWhat is the man doing?<|im_end|>\n<|im_start|>assistant",
        "He is playing a guitar.<|im_end|>",
        "<|im_start|>user\n  What color is it? <image><|im_end|>\n<|im_start|>assistant",
        "It is blue.<|im_end|>",
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant",
        "<|im_end|>",
    ],
}

EXPECTED_PROMPTS = {
    "llama2-base": (
        "In: <video>\nWhat is the man doing?\nOut: He is playing a guitar.</s>"
        "In: What color is it?\nOut: It is blue.</s>"
        "In: Why?\nOut:  </s>"
    ),
    "vicuna-v15": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "USER: <video>\nWhat is the man doing? ASSISTANT: He is playing a guitar.</s>"
        "USER: What color is it? ASSISTANT: It is blue.</s>"
        "USER: Why? ASSISTANT:  </s>"
    ),
    "llama3-chat": (
        "<|start_header_id|>system<|end_header_id|>\n\n" + MERV_CHAT_SYSTEM_PROMPT + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<video>\nWhat is the man doing?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHe is playing a guitar.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n  What color is it? <image><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is blue.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
    ),
    "llama2-chat": (  # `get_prompt()` drops the leading `<s>` only; the later turns keep theirs
        "[INST] <<SYS>\n" + MERV_CHAT_SYSTEM_PROMPT + "\n<</SYS>>\n\n<video>\nWhat is the man doing? [/INST] "
        "He is playing a guitar.</s>"
        "<s>[INST] What color is it? [/INST] It is blue.</s>"
        "<s>[INST] Why? [/INST]  </s>"
    ),
    "qwen25-chat": (
        "<|im_start|>system\n" + MERV_CHAT_SYSTEM_PROMPT + "<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat is the man doing?<|im_end|>\n<|im_start|>assistant\n"
        "He is playing a guitar.<|im_end|>"
        "<|im_start|>user\n  What color is it? <image><|im_end|>\n<|im_start|>assistant\n"
        "It is blue.<|im_end|>"
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
    ),
}

END_OF_TURN = {"llama2-base": "</s>", "vicuna-v15": "</s>", "llama3-chat": "<|eot_id|>", "qwen25-chat": "<|im_end|>",
               "llama2-chat": "</s>"}


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_llama_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    return tok


def test_every_config_format_has_a_builder():
    for fmt in PROMPT_FORMATS:
        assert build_prompt(CONVERSATION, fmt)


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_prompt_string_matches_release(fmt):
    assert build_prompt(CONVERSATION, fmt) == EXPECTED_PROMPTS[fmt]
    assert [t.rstrip() for t in wrap_turns(CONVERSATION, fmt)] == EXPECTED_TURNS[fmt]


def test_eval_prompt_ends_ready_for_the_answer():
    question = [{"from": "human", "value": "<video>\nWhat happens?"}]
    assert build_prompt(question, "llama2-base") == "In: <video>\nWhat happens?\nOut:"
    assert build_prompt(question, "vicuna-v15").endswith("USER: <video>\nWhat happens? ASSISTANT:")
    assert build_prompt(question, "qwen25-chat").endswith("<|im_start|>assistant\n")
    assert build_prompt(question, "llama2-chat") == ("[INST] <<SYS>\n" + MERV_CHAT_SYSTEM_PROMPT +
                                                     "\n<</SYS>>\n\n<video>\nWhat happens? [/INST]")


@pytest.mark.parametrize("fmt", ["llama2-base", "vicuna-v15", "llama2-chat"])
def test_video_tag_kept_image_tag_stripped(fmt):
    prompt = build_prompt(CONVERSATION, fmt)
    assert "<video>" in prompt and "<image>" not in prompt
    fixed = build_prompt(CONVERSATION, fmt, release_quirks=False)
    assert "<video>" not in fixed and "<image>" not in fixed


@pytest.mark.parametrize("fmt", ["llama3-chat", "qwen25-chat"])
def test_chat_formats_quirks_can_be_fixed(fmt):
    fixed_turns = wrap_turns(CONVERSATION, fmt, release_quirks=False)
    assert MERV_CHAT_SYSTEM_PROMPT in fixed_turns[0]  # the release never trains on the system prompt
    assert MERV_CHAT_SYSTEM_PROMPT not in wrap_turns(CONVERSATION, fmt)[0]
    fixed = build_prompt(CONVERSATION, fmt, release_quirks=False)
    assert fixed.count(MERV_CHAT_SYSTEM_PROMPT) == 1 and "<image>" not in fixed and "<video>" not in fixed


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
@pytest.mark.parametrize("has_visual", [True, False])
def test_labels_supervise_only_gpt_turns(tokenizer, fmt, has_visual):
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, fmt, max_length=4096, has_visual=has_visual)
    expected_ids, expected_labels = [], []
    for index, text in enumerate(EXPECTED_TURNS[fmt]):
        turn = tokenizer(text, add_special_tokens=index == 0).input_ids
        expected_ids += turn
        expected_labels += turn if index % 2 else [IGNORE_INDEX] * len(turn)
    assert ids == expected_ids and labels == expected_labels
    # BOS from the tokenizer on turn 0 only; llama2-chat's literal `<s>` opens every human turn on top of that.
    literal_bos = 3 if fmt == "llama2-chat" else 0
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1 + literal_bos
    assert labels[0] == IGNORE_INDEX
    # Every gpt turn is supervised through its end-of-turn token; human turns never are.
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN[fmt])
    supervised_ends = [i for i, (tok, lab) in enumerate(zip(ids, labels)) if tok == end_id and lab == end_id]
    assert len(supervised_ends) == 3
    assert labels[-1] == end_id


def test_llama2_chat_quirks_and_their_fix(tokenizer):
    """The release's `[INST]` builder: `<<SYS>` (one `>` short) and a literal `<s>` before the first `[INST]`, which a
    Llama-2 tokenizer reads as a second BOS; release_quirks=False writes Llama-2's own `<<SYS>>` and one BOS."""
    ids, _ = tokenize_conversation(CONVERSATION, tokenizer, "llama2-chat", 4096, has_visual=True)
    bos = tokenizer.bos_token_id
    assert ids[:3].count(bos) == 2 and ids[:2] == [bos, bos]
    fixed_turns = wrap_turns(CONVERSATION, "llama2-chat", release_quirks=False)
    assert fixed_turns[0].startswith("[INST] <<SYS>>\n" + MERV_CHAT_SYSTEM_PROMPT + "\n<</SYS>>\n\n")
    assert fixed_turns[2].startswith("<s>[INST] ") and "<video>" not in fixed_turns[0]
    fixed_ids, _ = tokenize_conversation(CONVERSATION, tokenizer, "llama2-chat", 4096, True, release_quirks=False)
    assert fixed_ids[0] == bos and fixed_ids[1] != bos


def test_truncation_at_max_length(tokenizer):
    full_ids, full_labels = tokenize_conversation(CONVERSATION, tokenizer, "llama2-base", 4096, True)
    cut = len(full_ids) - 5
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, "llama2-base", cut, True)
    assert len(ids) == len(labels) == cut
    assert ids == full_ids[:cut] and labels == full_labels[:cut]
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, "llama2-base", 1, True)
    assert ids == [tokenizer.bos_token_id] and labels == [IGNORE_INDEX]
    with pytest.raises(ValueError):
        tokenize_conversation(CONVERSATION, tokenizer, "llama2-base", 0, True)


def test_caption_sample_for_align_stage(tokenizer):
    sample = [{"from": "human", "value": "<video>\nDescribe it."}, {"from": "gpt", "value": " A dog runs. "}]
    ids, labels = tokenize_caption(sample, tokenizer, max_length=2048)
    assert ids == tokenizer("A dog runs.</s>").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels == [IGNORE_INDEX] + ids[1:]
    with pytest.raises(ValueError, match="turn 1"):
        tokenize_caption([sample[0], {"from": "gpt", "value": "<video> x"}], tokenizer, 2048)


@pytest.mark.parametrize(
    "conversation, index",
    [
        ([{"from": "gpt", "value": "hi"}], 0),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], 1),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human"}], 2),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], 1),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "system", "value": "c"}], 2),
        ([{"from": "human", "value": "a"}, "gpt: b"], 1),
    ],
)
def test_malformed_conversations_name_the_turn(tokenizer, conversation, index):
    with pytest.raises(ValueError, match=f"turn {index}"):
        tokenize_conversation(conversation, tokenizer, "llama2-base", 64, True)
    with pytest.raises(ValueError, match=f"turn {index}"):
        build_prompt(conversation, "vicuna-v15")


def test_empty_conversation_and_unknown_format(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        tokenize_conversation([], tokenizer, "llama2-base", 64, True)
    with pytest.raises(ValueError, match="llama2-base.*vicuna-v15.*llama3-chat.*qwen25-chat.*llama2-chat"):
        build_prompt(CONVERSATION, "mistral-instruct")
    with pytest.raises(ValueError, match="unknown prompt format"):
        tokenize_conversation(CONVERSATION, tokenizer, "mistral", 64, True)
