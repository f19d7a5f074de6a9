"""The release's evaluation prompts (spec section 7) and its multiple-choice scoring, on top of the training prompt
builders (merv_fast.data.prompts): one human turn, wrapped and right-stripped as the release's `get_prompt()`.

Multiple choice follows the release's `prepare_mcqa_question` (strategy "naive") character for character: the
question, the instruction with as many letters as the item has options, a blank line, then the lettered options
one per line; the first option line starts with four spaces (the indentation of the release's triple-quoted
f-string). Open-ended questions go in as they are (the release's `eval_openended.py`).
"""

from __future__ import annotations

import string

from merv_fast.data.prompts import build_prompt
from merv_fast.eval.layout import EvalItem

LETTERS = string.ascii_uppercase


def option_letters(count: int) -> list[str]:
    return list(LETTERS[:count])


def mc_message(question: str, options: tuple[str, ...] | list[str]) -> str:
    letters = option_letters(len(options))
    choices = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    return (f"{question} Select the correct answer from the following options. Write your answer as only one of "
            f"{', '.join(letters)} and nothing else.\n\n    {choices}")


def message_for(item: EvalItem) -> str:
    return mc_message(item.question, item.options) if item.options is not None else item.question


def prompt_for(item: EvalItem, prompt_format: str) -> str:
    """The whole prompt string the release tokenises (with BOS) for this question."""
    return question_prompt(message_for(item), prompt_format)


def question_prompt(message: str, prompt_format: str) -> str:
    """One human turn, ready for the answer (the release's `prompt_builder.add_turn` + `get_prompt()`)."""
    return build_prompt([{"from": "human", "value": message}], prompt_format)


def answer_letter(item: EvalItem) -> str:
    return LETTERS[item.answer_id]


def release_choice(prediction: str) -> str:
    """The release's reading of a generated answer: the first character of the lower-cased text (so "Because..."
    counts as option B, and an empty answer matches nothing)."""
    return prediction.lower()[:1]


def release_correct(prediction: str, item: EvalItem) -> bool:
    return release_choice(prediction) == answer_letter(item).lower()
