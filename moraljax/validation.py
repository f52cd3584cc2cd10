"""The project's one way to refuse a bad setting.

Every frozen settings dataclass (``config_lib``, ``llm.decoder_config``)
checks its fields in ``__post_init__`` with these helpers, so bad input fails
with one line in one format, before anything is loaded or compiled:

    <field>=<value> is not allowed; expected <what>.

This module imports nothing from moraljax: every layer may use it.
"""

import math
from collections.abc import Sequence
from typing import Any


def fail(field: str, value: Any, allowed: str) -> None:
    """Raises the project's error for a bad setting: the field, its value, what is allowed."""
    raise ValueError(f"{field}={value!r} is not allowed; expected {allowed}.")


def check_finite(field: str, value: float) -> None:
    """Refuses NaN/inf and non-numbers for `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(field, value, "a finite number")
    if not math.isfinite(value):
        fail(field, value, "a finite number")


def check_positive(field: str, value: float) -> None:
    """Refuses non-numbers, NaN/inf and numbers <= 0 for `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(field, value, "a finite number > 0")


def check_int(field: str, value: Any, minimum: int) -> None:
    """Refuses non-integers (bools included) and integers below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, value, f"an integer >= {minimum}")


def check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(field, value, "a positive integer")


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        fail(field, value, "one of " + ", ".join(repr(a) for a in allowed))


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(field, value, "True or False")
