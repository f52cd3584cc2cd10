"""One validation path: every refused setting reads the same way.

    <field>=<value> is not allowed; expected <what>.

Settings are checked where they enter (config files, evaluation settings,
prompt rendering, the action matcher), before anything is loaded or
compiled, so a user's mistake is one line naming the field, the value given
and what is allowed. This module imports nothing from the project: every
layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np


def fail(field: str, value: Any, expected: str) -> NoReturn:
    """Raises the project's error for a bad setting.

    Args:
        field: the setting's name as the user writes it (e.g. "run.seeds").
        value: the value given.
        expected: what is allowed, as a noun phrase.

    Raises:
        ValueError: always.
    """
    raise ValueError(f"{field}={value!r} is not allowed; expected {expected}.")


def check_number(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
    """Refuses anything but a number (an integer if asked) in a range.

    Bools are refused (they are ints to Python, never meant as numbers), and
    so are NaN and infinities.

    Args:
        field: the setting's name as the user writes it.
        value: the value given.
        low, high: the ends of the range; None leaves that side open-ended.
        low_open, high_open: whether that end itself is excluded.
        integer: only ints are allowed.
        allow_none: None is allowed too (e.g. "no clipping").

    Raises:
        ValueError: naming the field, the value and the range allowed, e.g.
            "ppo.lam=1.5 is not allowed; expected a finite number in [0, 1]."
    """
    if value is None and allow_none:
        return
    if integer:
        is_number = isinstance(value, int) and not isinstance(value, bool)
    else:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    in_range = is_number and (
        (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not in_range:
        fail(field, value, _number_range(low, high, low_open, high_open, integer) + (" or None" if allow_none else ""))


def _number_range(low, high, low_open, high_open, integer) -> str:
    """The range in words, e.g. "an integer >= 1" or "a finite number in [0, 1)"."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def check_finite(field: str, value: Any) -> None:
    """Refuses non-numbers (bools included), NaN and infinities."""
    check_number(field, value)


def check_int(field: str, value: Any, minimum: int) -> None:
    """Refuses non-integers (bools included) and integers below `minimum`."""
    check_number(field, value, low=minimum, integer=True)


def check_positive_int(field: str, value: Any) -> None:
    """Refuses anything but an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(field, value, "a positive integer")


def check_bit(field: str, value: Any) -> int:
    """A host 0/1 index (a move or an option-order bit) as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) not in (0, 1):
        fail(field, value, "0 or 1")
    return int(value)


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> None:
    """Refuses a value that is not one of `allowed`."""
    if value not in allowed:
        fail(field, value, "one of " + ", ".join(repr(a) for a in allowed))


def check_names(field: str, value: Any, allowed: Sequence[str], *, empty_ok: bool) -> tuple[str, ...]:
    """A list of distinct names from `allowed`, as a tuple."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        fail(field, value, "a list of names from " + ", ".join(allowed))
    value = tuple(value)
    if not value and not empty_ok:
        fail(field, value, "a non-empty list of names from " + ", ".join(allowed))
    unknown = [v for v in value if v not in allowed]
    if unknown:
        fail(field, value, "names from " + ", ".join(allowed) + f" (unknown: {unknown})")
    if len(set(value)) != len(value):
        fail(field, value, "distinct names")
    return value


def check_actions(field: str, value: Any, *, exactly: int | None = None) -> tuple[str, ...]:
    """Action strings: non-empty, distinct, stripped, matchable; as a tuple.

    The host parsing rule strips the decoded text and decodes invalid bytes
    to U+FFFD, so an action with surrounding blanks or holding U+FFFD could
    never be matched.

    Args:
        field: the setting's name.
        value: a sequence of strings (index i is action i; C's first).
        exactly: the number of strings required, or None for any >= 1.

    Returns:
        The strings as a tuple.
    """
    if isinstance(value, str) or not isinstance(value, Sequence):
        fail(field, value, "a sequence of action strings, e.g. ('action1', 'action2')")
    actions = tuple(value)
    if exactly is not None and len(actions) != exactly:
        fail(field, value, f"exactly {exactly} action strings (C's first, then D's)")
    if not actions:
        fail(field, value, "at least one action string")
    if not all(isinstance(a, str) and a for a in actions):
        fail(field, value, "non-empty strings")
    if any(a != a.strip() for a in actions):
        fail(field, value, "strings without surrounding blanks (equal to their .strip())")
    if any("\ufffd" in a for a in actions):
        fail(field, value, "strings without U+FFFD (the decoder's replacement character)")
    if not all(_encodes(a) for a in actions):
        fail(field, value, "valid unicode text (no lone surrogates)")
    if len(set(actions)) != len(actions):
        fail(field, value, "distinct strings")
    return actions


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_action_pair(field: str, value: Any) -> tuple[str, str]:
    """Two action strings, C's first, as a tuple (see `check_actions`)."""
    return check_actions(field, value, exactly=2)


def _tuples(value: Any) -> Any:
    """Lists (as JSON and ConfigDicts give them) to tuples, nested ones too."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def settings_from_dict(cls, values: Any, *, prefix: str = "", what: str = "a setting"):
    """Builds the frozen dataclass `cls` from a mapping, refusing unknown keys.

    Lists become tuples (frozen dataclasses hold tuples); each field's own
    check runs in `cls.__post_init__`.

    Args:
        cls: the dataclass.
        values: {field: value}.
        prefix: written before field names in messages (e.g. "run.").
        what: what the fields are, for the message (e.g. "a field of run").

    Returns:
        cls(**values).

    Raises:
        ValueError: naming the first unknown field, and the fields allowed.
    """
    values = dict(values)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        fail(prefix + unknown[0], values[unknown[0]], f"{what}: {', '.join(sorted(names))}")
    return cls(**{key: _tuples(value) for key, value in values.items()})


def check_positive(field: str, value: float) -> None:
    """Refuses non-numbers, NaN/inf and numbers <= 0 for `field`."""
    check_number(field, value, low=0, low_open=True)


def check_bool(field: str, value: Any) -> None:
    """Refuses anything but True or False."""
    if not isinstance(value, bool):
        fail(field, value, "True or False")
