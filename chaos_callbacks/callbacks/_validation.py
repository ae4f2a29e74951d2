"""Argument checks shared by the callbacks.

Each check returns the value normalised (numpy integers become ``int``, integral numbers used as
floats become ``float``) or raises ``ValueError("<Callback>: <argument> must be …, got …")``. Bools
are never accepted where a number goes, floats never where an int goes, and NaN/inf never.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def _fail(owner: str, name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{owner}: {name} must be {expected}, got {value!r}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer (``int`` or numpy integer) in ``[minimum, maximum]``, or ``None`` if allowed."""
    if value is None and allow_none:
        return None
    bounds = f" >= {minimum}" if minimum is not None else ""
    bounds += f" and <= {maximum}" if maximum is not None else ""
    expected = f"an int{bounds}" + (" or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise _fail(owner, name, expected, value)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(owner, name, expected, value)
    return value


def check_float(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite real number in the interval given by ``low``/``high`` (open ends if asked), or ``None`` if allowed."""
    if value is None and allow_none:
        return None
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    expected = f"a finite number{interval}" + (" or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _fail(owner, name, expected, value)
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise _fail(owner, name, expected, value)
    if high is not None and (value > high or (high_open and value == high)):
        raise _fail(owner, name, expected, value)
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy bools accepted)."""
    if not _is_bool(value):
        raise _fail(owner, name, "True or False", value)
    return bool(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices`` (compared by equality; strings only match strings)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise _fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def check_callable(owner: str, name: str, value: Any, allow_none: bool = True) -> Callable[..., Any] | None:
    """A callable, or ``None`` if allowed."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise _fail(owner, name, "a callable" + (" or None" if allow_none else ""), value)
    return value


def check_probe(owner: str, name: str, value: Any) -> str | int:
    """``"batch"`` or a positive number of examples."""
    if isinstance(value, str):
        if value != "batch":
            raise _fail(owner, name, "'batch' or a positive int (number of probe examples)", value)
        return value
    return check_int(owner, name, value, minimum=1)  # type: ignore[return-value]


def check_regex(owner: str, name: str, value: Any, allow_none: bool = True) -> re.Pattern[str] | None:
    """A valid regular expression (compiled), or ``None`` if allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise _fail(owner, name, "a regular expression string" + (" or None" if allow_none else ""), value)
    try:
        return re.compile(value)
    except re.error as exc:
        raise _fail(owner, name, f"a valid regular expression ({exc})", value) from exc


_PREFIX = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*/?")


def check_prefix(owner: str, name: str, value: Any) -> str:
    """A tag prefix: ``""`` or names of letters, digits, ``_.-`` joined by single slashes (e.g. ``"probe_a/"``)."""
    if not isinstance(value, str) or (value and not _PREFIX.fullmatch(value)):
        raise _fail(owner, name, "a string of letters, digits, '_.-' and single '/' not starting with '/' (e.g. 'probe_a/')", value)
    return value


_TAG_PART = re.compile(r"[A-Za-z0-9_.\-]+")


def check_tag_part(owner: str, name: str, value: Any) -> str:
    """One part of a tag (``<area>/<part>/<quantity>``): a non-empty string of letters, digits and ``_.-``, no ``/``."""
    if not isinstance(value, str) or not _TAG_PART.fullmatch(value):
        raise _fail(owner, name, "a non-empty name of letters, digits and '_.-' (no '/': it is one part of a tag)", value)
    return value


def check_cold_start_budget(owner: str, name: str, budget: int, dim: int, runs: int = 1) -> None:
    """A product budget that can certify a cold Lanczos estimate of ``dim`` parameters: each of ``runs``
    runs from a random start takes :func:`~chaos_callbacks.curvature.lanczos.cold_start_matvecs` products
    before it may stop. A smaller budget would skip every estimate (the first one never certifies, so
    no warm vectors ever come)."""
    from chaos_callbacks.curvature.lanczos import cold_start_matvecs

    need = runs * cold_start_matvecs(dim)
    if budget < need:
        what = "the top-k run and its deflation check each take" if runs > 1 else "a cold estimate takes"
        raise ValueError(f"{owner}: {name}={budget} is below the {need} products {what} before it may stop at {dim} "
                         f"parameters (cold_start_matvecs: what makes missing lambda_max by 10% of the spread at most 1% "
                         f"likely); every estimate would be skipped. Use {name} >= {need}")
