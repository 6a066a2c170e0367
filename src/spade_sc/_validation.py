"""The checks that many public functions repeat: integers in range, choices, fractions, JSON-safe records.

Each raises a ``ValueError`` (``TypeError`` for a wrong type) whose message names the argument at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["check_choice", "check_fraction", "check_int", "check_ints", "check_mpp", "json_safe", "uns_safe"]


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def check_int(
    value: Any,
    name: str,
    *,
    low: int = 1,
    high: int | None = None,
    none_ok: bool = False,
    why: str = "",
) -> int | None:
    """``value`` as an ``int`` after checking it is an integer in ``[low, high)`` (``high=None``: no upper bound).

    ``none_ok`` lets None through. The message names ``name`` and, with ``why``, the reason for the bounds.
    """
    if value is None and none_ok:
        return None
    if not _is_int(value) or value < low or (high is not None and value >= high):
        if low == 1 and high is None:
            what = "a positive integer"
        elif high is None:
            what = f"an integer >= {low}"
        else:
            what = f"an integer in [{low}, {high})"
        msg = f"{name} must be {what}{' or None' if none_ok else ''}{why}, got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_ints(values: Any, name: str, *, low: int = 1) -> list[int]:
    """A non-empty sequence of integers ``>= low`` as a list of ``int``."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        values = [values]
    values = list(values)
    if not values or not all(_is_int(v) and v >= low for v in values):
        what = "positive integers" if low == 1 else f"integers >= {low}"
        msg = f"{name} must be a non-empty sequence of {what}, got {values!r}."
        raise ValueError(msg)
    return [int(v) for v in values]


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` after checking it is one of ``choices``."""
    if value not in choices:
        msg = f"{name}={value!r}; choose one of {tuple(choices)}."
        raise ValueError(msg)
    return value


def check_fraction(value: Any, name: str, *, closed_low: bool = True, closed_high: bool = False) -> float:
    """``value`` as a float in the unit interval, ``[0, 1)`` by default."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok_low = v >= 0 if closed_low else v > 0
    ok_high = v <= 1 if closed_high else v < 1
    if not (np.isfinite(v) and ok_low and ok_high):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        msg = f"{name} must be in {interval}, got {value!r}."
        raise ValueError(msg)
    return v


def check_mpp(value: Any, name: str = "mpp") -> float:
    """``value`` as a float after checking it is a positive, finite number of micrometres per pixel."""
    number = not isinstance(value, bool) and isinstance(value, int | float | np.number)
    if not number or not np.isfinite(value) or value <= 0:
        msg = f"{name} must be a positive number of micrometres per pixel, got {value!r}."
        raise ValueError(msg)
    return float(value)


def json_safe(obj: Any) -> Any:
    """Numpy scalars and arrays to Python scalars and lists, tuples to lists, keys to str, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def uns_safe(obj: Any) -> Any:
    """Like :func:`json_safe`, dropping None values inside mappings (AnnData cannot write them)."""
    obj = json_safe(obj)
    if isinstance(obj, dict):
        return {k: uns_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [uns_safe(v) for v in obj]
    return obj
