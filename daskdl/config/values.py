"""Checks of one option's value: an integer, a real number in a range, a flag, a choice. Each
names the option, what was seen and, where it helps, the fix."""

from __future__ import annotations

import math
import numbers
from typing import Literal, overload

import numpy as np


def integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (any integral number: numpy's too, not ``bool``), at least
    ``minimum``; else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, numbers.Real) and float(value).is_integer():
            hint = f" Pass {name}={int(float(value))}."
        raise ValueError(f"{name} must be an integer, got {value!r}.{hint}")
    value = int(value)
    if minimum is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}.")
    return value


def real(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` in the range given; else a ``ValueError`` naming the
    option, the range and what was seen."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.{hint}")
    value = float(value)
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if low is not None and high is not None:
            what = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        elif low is not None:
            what = f"{'>' if open_low else '>='} {low:g}"
        else:
            what = "finite"
        what = "a positive number" if (low == 0 and open_low and high is None) else what
        raise ValueError(f"{name} must be {what}, got {value!r}.{hint}")
    return value


@overload
def flag(name: str, value, allow_none: Literal[False] = False) -> bool: ...
@overload
def flag(name: str, value, allow_none: bool) -> bool | None: ...
def flag(name: str, value, allow_none: bool = False) -> bool | None:
    """``value`` as a ``bool`` (numpy's too), or ``None`` where that means "automatic"."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    what = "True, False or None (automatic)" if allow_none else "True or False"
    raise ValueError(f"{name} must be {what}, got {value!r}.")


def choice(name: str, value, choices: tuple, hint: str = ""):
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.{hint}")
    return value
