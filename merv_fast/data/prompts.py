"""Prompt formats and conversation tokenisation, reproducing the MERV release token for token.

The release (Prismatic's design) wraps each turn of a LLaVA-style conversation with a per-LLM "prompt builder",
right-strips each wrapped turn, tokenises every turn on its own (special tokens, i.e. BOS, only on the first) and
supervises only the gpt turns. The formats, as the release defines them:

- ``llama2-base``: Prismatic's ``PurePromptBuilder`` (the builder of ``llama2-7b-pure``, MERV's default LLM):
  ``In: {human}\\nOut: `` then ``{gpt}</s>``; no system prompt.
- ``vicuna-v15``: the release's ``VicunaV15ChatPromptBuilder``: the LLaVA system prompt and a space before the first
  ``USER: {human} ASSISTANT: ``, then ``{gpt}</s>``.
- ``llama3-chat``: the release's ``LLaMa31PromptBuilder`` (backbone ``llama3.1-8b-chat``): Llama-3 header tokens.
  (The release's other Llama-3 id, ``llama3-8b-chat``, used the Llama-2 ``[INST]`` builder; we do not offer that.)
- ``qwen25-chat``: the release's ``Qwen2PromptBuilder`` (``qwen2.5-*-instruct``): ChatML without the newline
  that the official template puts after each ``<|im_end|>``.
- ``llama2-chat``: the release's ``LLaMa2ChatPromptBuilder`` (backbones ``llama2-*-chat`` and ``llama3-8b-chat``):
  ``<s>[INST] {human} [/INST] `` then ``{gpt}</s>``, the system prompt inside the first ``[INST]``.

Release quirks kept by default (``release_quirks=True``); ``release_quirks=False`` fixes them:

- the two Prismatic-style formats strip ``<image>`` but leave the literal ``<video>`` in the text; the chat formats
  strip neither and do not ``.strip()`` messages or replace an empty gpt message by a space (fixing only
  strips both tags and the whitespace);
- ``llama2-chat`` writes its system block as ``<<SYS>\n`` (one ``>`` short of Llama-2's ``<<SYS>>``) and starts
  every human turn, the first included, with a literal ``<s>``: a Llama-2 tokenizer reads it as BOS, so the first
  turn starts with two BOS tokens (the visual tokens go between them); a Llama-3 tokenizer (``llama3-8b-chat``)
  reads ``<s>`` and ``</s>`` as plain text, so that backbone's answers end in the text ``</s>``, not an end token;
- the chat formats put their system prompt only into the prompt string (``build_prompt``, used at evaluation),
  never into the training tokens, because the release's builders return just the wrapped turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from merv_fast.config import PROMPT_FORMATS

IGNORE_INDEX = -100  # HF's cross-entropy ignore label

LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MERV_CHAT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class PromptFormat:
    """How one LLM family wraps turns. `first_human` also carries the system prompt where it goes into the turns."""

    name: str
    human: Callable[[str], str]
    gpt: Callable[[str], str]
    first_human: Callable[[str], str] | None = None  # None: same as `human`
    header: str = ""  # text the prompt starts with that is not part of any turn (the chat formats' system prompt)
    prismatic: bool = True  # Prismatic-style builder: cleans messages and right-strips the whole prompt string
    first_human_fixed: Callable[[str], str] | None = None  # `first_human` with the release's quirks fixed


def _prismatic_gpt(message: str) -> str:
    # Prismatic replaces an empty answer by one space so that the turn is never just the EOS.
    return f"{message if message != '' else ' '}</s>"


def _llama2_base_human(message: str) -> str:
    return f"In: {message}\nOut: "


def _vicuna_human(message: str) -> str:
    return f"USER: {message} ASSISTANT: "


def _llama3_human(message: str) -> str:
    return (f"<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _qwen_human(message: str) -> str:
    return f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


def _inst_human(message: str) -> str:
    return f"<s>[INST] {message} [/INST] "


def _inst_system(opening: str) -> str:
    return f"{opening}\n{MERV_CHAT_SYSTEM_PROMPT}\n<</SYS>>\n\n"


FORMATS: dict[str, PromptFormat] = {
    "llama2-base": PromptFormat("llama2-base", human=_llama2_base_human, gpt=_prismatic_gpt),
    "vicuna-v15": PromptFormat(
        "vicuna-v15", human=_vicuna_human, gpt=_prismatic_gpt,
        first_human=lambda m: f"{LLAVA_SYSTEM_PROMPT} {_vicuna_human(m)}",
    ),
    "llama3-chat": PromptFormat(
        "llama3-chat", human=_llama3_human, gpt=lambda m: f"{m}<|eot_id|>", prismatic=False,
        header=f"<|start_header_id|>system<|end_header_id|>\n\n{MERV_CHAT_SYSTEM_PROMPT}<|eot_id|>",
    ),
    "qwen25-chat": PromptFormat(
        "qwen25-chat", human=_qwen_human, gpt=lambda m: f"{m}<|im_end|>", prismatic=False,
        header=f"<|im_start|>system\n{MERV_CHAT_SYSTEM_PROMPT}<|im_end|>\n",
    ),
    "llama2-chat": PromptFormat(
        "llama2-chat", human=_inst_human, gpt=_prismatic_gpt,
        first_human=lambda m: _inst_human(_inst_system("<<SYS>") + m),
        # Fixed: Llama-2's `<<SYS>>`, and no literal `<s>` on the first turn (the tokenizer adds BOS there).
        first_human_fixed=lambda m: _inst_human(_inst_system("<<SYS>>") + m).removeprefix("<s>"),
    ),
}
assert tuple(FORMATS) == PROMPT_FORMATS, "config.PROMPT_FORMATS and the prompt builders must list the same formats"


def get_format(prompt_format: str) -> PromptFormat:
    if prompt_format not in FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; valid formats are {list(FORMATS)}")
    return FORMATS[prompt_format]


def validate_conversation(conversation: list[dict]) -> None:
    """Alternating human/gpt turns starting with human, each `{"from": ..., "value": str}`; may end on human."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("conversation must be a non-empty list of turns")
    for index, turn in enumerate(conversation):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {index}: expected a dict with a string 'value', got {turn!r}")
        if turn.get("from") != expected:
            raise ValueError(f"turn {index}: expected 'from' == {expected!r} (turns alternate human/gpt, "
                             f"starting with human), got {turn.get('from')!r}")


def _clean(message: str, fmt: PromptFormat, release_quirks: bool) -> str:
    if not release_quirks:
        return message.replace("<image>", "").replace("<video>", "").strip()
    if fmt.prismatic:
        return message.replace("<image>", "").strip()  # the release's quirk: `<video>` stays in the text
    return message  # the release's chat builders take messages verbatim


def wrap_turns(conversation: list[dict], prompt_format: str, release_quirks: bool = True) -> list[str]:
    """Each turn as the release's `PromptBuilder.add_turn` returns it: the text that turn adds to the context."""
    fmt = get_format(prompt_format)
    validate_conversation(conversation)
    wrapped = []
    for index, turn in enumerate(conversation):
        message = _clean(turn["value"], fmt, release_quirks)
        if index % 2 == 1:
            wrapped.append(fmt.gpt(message))
        elif index == 0 and fmt.first_human is not None:
            fixed = not release_quirks and fmt.first_human_fixed is not None
            wrapped.append((fmt.first_human_fixed if fixed else fmt.first_human)(message))
        elif index == 0 and not release_quirks:
            wrapped.append(fmt.header + fmt.human(message))  # fixed: the system prompt is trained on too
        else:
            wrapped.append(fmt.human(message))
    return wrapped


def build_prompt(conversation: list[dict], prompt_format: str, release_quirks: bool = True) -> str:
    """The whole prompt as a string, as the release's `get_prompt()` gives it (for display and evaluation).

    Prismatic-style formats drop a leading `<s>` and right-strip (the tokenizer adds BOS, and a trailing space would
    become a stray token); the chat formats start with their system header and are returned unstripped.
    """
    fmt = get_format(prompt_format)
    turns = wrap_turns(conversation, prompt_format, release_quirks)
    if fmt.prismatic:
        return "".join(turns).removeprefix("<s>").rstrip()
    header = fmt.header if release_quirks else ""  # without the quirk the header is already in turn 0
    return header + "".join(turns)


def tokenize_conversation(conversation: list[dict], tokenizer, prompt_format: str, max_length: int,
                          has_visual: bool, *, release_quirks: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a finetune-stage conversation, exactly as the release's `FinetuneVideoDataset`.

    Turns are right-stripped (a Llama fast tokenizer turns trailing whitespace into a token) and tokenised
    separately, with special tokens only on the first. Human turns are labelled IGNORE_INDEX, gpt turns with their
    own ids (the `</s>` / end-of-turn token included). The sequence is cut at `max_length`; with a visual input the
    first label (BOS, which the visual tokens will follow) is IGNORE_INDEX too.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    for index, text in enumerate(wrap_turns(conversation, prompt_format, release_quirks)):
        turn_ids = list(tokenizer(text.rstrip(), add_special_tokens=index == 0).input_ids)
        input_ids.extend(turn_ids)
        labels.extend(turn_ids if index % 2 == 1 else [IGNORE_INDEX] * len(turn_ids))
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if has_visual and labels:
        labels[0] = IGNORE_INDEX
    return input_ids, labels


def tokenize_caption(conversation: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an align-stage (stage 1) sample, as the release's `AlignVideoDataset`.

    Only the caption (the gpt turn of a 2-turn conversation) is used: `{caption}{eos}` with BOS, every token
    supervised except the first (the BOS that the visual tokens follow), whatever the prompt format.
    """
    validate_conversation(conversation)
    if len(conversation) != 2:
        raise ValueError(f"an align-stage conversation has exactly 2 turns, got {len(conversation)}")
    caption = conversation[1]["value"]
    if "<image>" in caption or "<video>" in caption:
        raise ValueError("turn 1: an align-stage caption must not contain <image> or <video>")
    input_ids = list(tokenizer(caption.strip() + tokenizer.eos_token).input_ids)[:max_length]
    labels = list(input_ids)
    if labels:
        labels[0] = IGNORE_INDEX
    return input_ids, labels
