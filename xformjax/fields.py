"""Type and range checks of the fields of frozen configuration dataclasses.

Each check takes the dataclass's name (``owner``), the field's name and its value,
and raises

* ``TypeError`` when the value has the wrong type (a ``bool`` is never taken for a
  number, a number never for a string);
* ``ValueError`` when it has the right type and a bad value (out of range, NaN, not
  one of the choices);

with the message ``"{owner}: `{name}` must be {what}; got {value!r}"`` (type errors
add the type's name). Used by :class:`~xformjax.nn.config.MixerConfig` and
:class:`~xformjax.models.config.LMConfig` in their ``__post_init__``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import jax.numpy as jnp
import numpy as np

__all__ = ["check_bool", "check_choice", "check_float", "check_float_dtype", "check_int"]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> TypeGuard[float]:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1, optional: bool = False):
    """``value`` is an int ≥ ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    what = f"an int ≥ {minimum}" + (" or None" if optional else "")
    if not _is_int(value):
        raise TypeError(f"{owner}: `{name}` must be {what}; got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be {what}; got {value!r}")


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    optional: bool = False,
):
    """``value`` is a finite real number (``None`` when ``optional``) with
    ``value > above``, ``value ≥ at_least`` and ``value ≤ at_most`` for the bounds given."""
    if value is None and optional:
        return
    bounds = [
        f"{sign} {bound:g}"
        for sign, bound in ((">", above), ("≥", at_least), ("≤", at_most))
        if bound is not None
    ]
    what = " ".join(["a finite number", " and ".join(bounds)]).rstrip()
    what += " or None" if optional else ""
    if not _is_real(value):
        raise TypeError(f"{owner}: `{name}` must be {what}; got {_got(value)}")
    number = float(value)
    if (
        not math.isfinite(number)
        or (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (at_most is not None and not number <= at_most)
    ):
        raise ValueError(f"{owner}: `{name}` must be {what}; got {value!r}")


def check_bool(owner: str, name: str, value: Any):
    """``value`` is ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: `{name}` must be a bool; got {_got(value)}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]):
    """``value`` is one of the strings ``choices``."""
    what = f"one of {', '.join(repr(c) for c in choices)}"
    if not isinstance(value, str):
        raise TypeError(f"{owner}: `{name}` must be {what}; got {_got(value)}")
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be {what}; got {value!r}")


def check_float_dtype(owner: str, name: str, value: Any):
    """``value`` names a floating dtype (``"float32"``, ``"bfloat16"``, ``jnp.float32`` …)."""
    what = "a floating dtype such as 'float32' or 'bfloat16'"
    if not isinstance(value, (str, np.dtype, type)):
        raise TypeError(f"{owner}: `{name}` must be {what}; got {_got(value)}")
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{owner}: `{name}` must be {what}; got {value!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{owner}: `{name}` must be {what}; got {value!r} ({dtype})")
