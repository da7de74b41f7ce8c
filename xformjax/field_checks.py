"""Checks of configuration fields: an integer or a real number within bounds.

The frozen config dataclasses (:mod:`xformjax.train.config`) and the synthetic tasks
(:mod:`xformjax.data.tasks`) call these from ``__post_init__``. ``where`` names the
field as the caller's messages do (``"train.steps"``, ``"MQAR: `num_pairs`"``); a
value of the wrong type raises ``TypeError``, one out of range ``ValueError``::

    check_int("train.steps", 0, low=1)
    # ValueError: train.steps must be ≥ 1; got 0
    check_real("train.learning_rate", float("nan"), low=0, low_open=True)
    # ValueError: train.learning_rate must be finite and > 0; got nan
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_real"]


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return ""


def _within(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_int(where: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an integer; got {value!r} ({type(value).__name__})")
    if not _within(value, low, high, False, False):
        raise ValueError(f"{where} must be {_bounds(low, high, False, False)}; got {value!r}")
    return int(value)


def check_real(
    where: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a ``float`` if it is a finite real number (not a bool) within the
    bounds (``low_open`` / ``high_open``: the bound itself is excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number; got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not _within(value, low, high, low_open, high_open):
        bounds = _bounds(low, high, low_open, high_open)
        expected = f"finite and {bounds}" if bounds else "finite"
        raise ValueError(f"{where} must be {expected}; got {float(value)!r}")
    return float(value)
