"""The checks that many public functions repeat: integers in range, choices, fractions, names, JSON-safe records.

Each raises a ``ValueError`` (``TypeError`` for a wrong type) whose message names the argument at fault. Two context
managers put the package's own message around errors raised inside other libraries: :func:`file_errors` (a file
that cannot be parsed, named in a ``ValueError``) and :func:`named_errors` (a slide or section of a cohort, named in
front of whatever went wrong while it was processed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIN_PAIRS",
    "as_ids",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_ints",
    "check_key_name",
    "check_mpp",
    "check_pairs",
    "file_errors",
    "json_safe",
    "named_errors",
    "read_json",
    "uns_safe",
]

#: What a key or element name may hold (the rule spade_sc applies to the names it makes, and spatialdata's).
_KEY_NAME = re.compile(r"[0-9A-Za-z_.-]+")
#: Errors never wrapped: the user stopped the call, or the machine ran out of memory.
_NEVER_WRAPPED = (KeyboardInterrupt, SystemExit, MemoryError, RecursionError)
#: A contrastive batch needs at least this many pairs of one data expert.
MIN_PAIRS = 2


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


# --------------------------------------------------------------------------------------------------------------------
# names and ids
# --------------------------------------------------------------------------------------------------------------------
def check_key_name(value: Any, what: str, *, where: str = "") -> str:
    """``value`` after checking it can name a key or an element: what spade_sc accepts for the names it makes.

    A non-empty string of ASCII letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` or ``__`` (no path
    separators, no ``..``). Used on every key and name read from a file (model folders, ``uns`` records, file names),
    before anything is written under it.

    Parameters
    ----------
    value
        The name.
    what
        What the name is (e.g. ``"init_params['features_key']"``), to name it in the message.
    where
        The file or object it comes from, to start the message with.

    Returns
    -------
    The name.
    """
    ok = isinstance(value, str) and _KEY_NAME.fullmatch(value) is not None and not value.startswith((".", "__"))
    if not ok:
        prefix = f"{where}: " if where else ""
        msg = (
            f"{prefix}{what}={value!r} is not a valid key name: use ASCII letters, digits, '_', '-' and '.' only, "
            "not starting with '.' or '__'."
        )
        raise ValueError(msg)
    return value


def as_ids(value: Any, name: str, known: Iterable[str] | None = None) -> list[str] | None:
    """One id (a string) or a sequence of ids as a list of strings; None stays None.

    A single string is one id, never a sequence of characters (``"slide0"`` is ``["slide0"]``). With ``known``,
    every id must be among them; duplicates are an error.
    """
    if value is None:
        return None
    if isinstance(value, str):
        ids = [value]
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        ids = list(value)
    else:
        msg = f"{name} must be an id (a string) or a sequence of ids, got {type(value).__name__}."
        raise TypeError(msg)
    bad = [v for v in ids if not isinstance(v, str)]
    if bad:
        msg = f"{name} must hold string ids, got {bad[:5]!r}."
        raise TypeError(msg)
    dup = sorted({v for v in ids if ids.count(v) > 1})
    if dup:
        msg = f"{name} holds duplicated ids {dup[:5]}."
        raise ValueError(msg)
    if known is not None:
        known = list(known)
        unknown = [v for v in ids if v not in known]
        if unknown:
            msg = f"{name} {unknown} are not among {sorted(known)}."
            raise ValueError(msg)
    return ids


# --------------------------------------------------------------------------------------------------------------------
# errors of other libraries, named
# --------------------------------------------------------------------------------------------------------------------
@contextmanager
def file_errors(path: str | Path, what: str = "file", *, where: str = "") -> Iterator[None]:
    """Turn any error raised while a file is parsed into a ``ValueError`` naming the file.

    Wrap the library call that reads ``path`` (pandas, PIL, h5py, safetensors, json, ...). A missing file
    (:class:`FileNotFoundError`) and a built-in exception whose message already names the file pass unchanged;
    anything else (a library's own exception type, or a message without the file) becomes
    ``ValueError("<where>: the <what> <path> cannot be read (<type>: <message>)")``, chained to the original.

    Parameters
    ----------
    path
        The file (or folder) being read.
    what
        What it is (``"counts file"``, ``"model config"``), for the message.
    where
        The section, slide or sample it belongs to, to start the message with.
    """
    try:
        yield
    except _NEVER_WRAPPED:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:
        if type(err).__module__ == "builtins" and str(path) in str(err):
            raise  # already ours, or a plain OSError naming the file
        prefix = f"{where}: the" if where else "The"
        detail = str(err).strip() or "no message"
        msg = f"{prefix} {what} {path} cannot be read ({type(err).__name__}: {detail})."
        raise ValueError(msg) from err


def read_json(path: str | Path, what: str = "JSON file", *, where: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not valid UTF-8 JSON, or not an object, is a ``ValueError``."""
    path = Path(path)
    with file_errors(path, what, where=where):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        prefix = f"{where}: the" if where else "The"
        msg = f"{prefix} {what} {path} holds a JSON {type(data).__name__}; a JSON object is expected."
        raise ValueError(msg)
    return data


@contextmanager
def named_errors(name: str, where: str | None = None) -> Iterator[None]:
    """Put ``where`` (default ``"Slide '<name>'"``) in front of any error whose message does not name the slide.

    For the loops of cohort functions over slides: an error raised inside a library while one slide is processed
    (a bad image, no tissue, a failing encoder) then says which slide it was. The exception keeps its type when it
    can be rebuilt from a message (``ValueError``, ``KeyError``, ``TypeError``, ``OSError``, ``RuntimeError``, ...),
    else it becomes a ``ValueError``; it is chained to the original.
    """
    where = where or f"Slide {name!r}"
    try:
        yield
    except _NEVER_WRAPPED:
        raise
    except Exception as err:
        text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        if where.lower() in text.lower() or f"slide {name!r}".lower() in text.lower():
            raise  # already names the slide
        msg = f"{where}: {text}"
        try:
            new = type(err)(msg)
        except Exception:
            new = ValueError(msg)
        raise new from err


# --------------------------------------------------------------------------------------------------------------------
# training pairs
# --------------------------------------------------------------------------------------------------------------------
def check_pairs(train: Mapping[str, np.ndarray], validation: Mapping[str, np.ndarray] | None = None) -> None:
    """Refuse a training that could not take a single step, or a validation that could give no loss.

    A contrastive batch holds pairs of one data expert, and needs at least :data:`MIN_PAIRS` (2) of them: the
    training groups must hold at least 2 pairs of one expert, and so must the validation groups when there are any.

    Parameters
    ----------
    train
        ``{group: expert index of every training pair}``.
    validation
        ``{group: expert index of every validation pair}``; None or empty: no validation.
    """
    for role, groups in (("training", train), ("validation", validation or {})):
        if role == "validation" and not groups:
            continue
        experts = np.concatenate([np.asarray(e).ravel() for e in groups.values()]) if groups else np.zeros(0)
        most = int(np.unique(experts, return_counts=True)[1].max()) if experts.size else 0
        if most < MIN_PAIRS:
            sizes = {g: int(np.asarray(e).size) for g, e in groups.items()}
            fix = (
                "add spots or slides, or lower n_experts"
                if role == "training"
                else "hold out more spots or slides, or pass validation_fraction=0 (no validation)"
            )
            msg = (
                f"Too few {role} pairs: {experts.size} in {sizes}, at most {most} of one data expert. A contrastive "
                f"batch needs at least {MIN_PAIRS} pairs of one expert, so {role} needs at least {MIN_PAIRS} pairs "
                f"(of one expert); {fix}."
            )
            raise ValueError(msg)
