"""Weights never load loosely: a weights file must hold exactly the tensors the model expects, each with its shape.

Every reader of trained weights (release checkpoints, our safetensors exports, our training checkpoints) compares the
file's key set and shapes with the model's before loading, and a mismatch fails with the first few missing,
unexpected and misshapen keys, and the preset the file says it was trained as, when it says so.
"""

from __future__ import annotations

from typing import Mapping, Sequence

SHOWN = 5  # keys named per kind of mismatch


class WeightsMismatchError(ValueError):
    """Trained weights that do not fit the model they are loaded into."""


def mismatch_message(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], source: str,
                     model_name: str, trained_as: str | None = None) -> str | None:
    """None when `found` (the file's key -> shape) holds exactly `expected` (the model's), else the message naming
    the file, the model, the first missing / unexpected / misshapen keys and `trained_as`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in expected if k in found and tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshapen):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {missing[:SHOWN]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[:SHOWN]}")
    if misshapen:
        k = misshapen[0]
        parts.append(f"{len(misshapen)} key(s) of another shape, first {k!r}: {tuple(found[k])} in the file, "
                     f"{tuple(expected[k])} in the model")
    said = f"; the file says it was trained as preset {trained_as!r}" if trained_as else ""
    return f"{source}: does not fit model {model_name!r}: {'; '.join(parts)}{said}"


def check_weights(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], source: str,
                  model_name: str, trained_as: str | None = None,
                  error: type[Exception] = WeightsMismatchError) -> None:
    """Raise `error` with `mismatch_message` unless the key sets and shapes agree."""
    message = mismatch_message(expected, found, source, model_name, trained_as)
    if message is not None:
        raise error(message)
