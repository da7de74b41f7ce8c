"""Value checks that work eagerly and, with ``check_values`` on, under ``jit``.

Shape and dtype checks need only the abstract array and always run (see
:mod:`.validation`). Value checks (a log-gate ≤ 0, β in [0, 2], a token in the
vocabulary) need the values:

* a concrete array (an eager call) is checked at once and a violation raises
  ``ValueError("{op}: `{name}` must be {expected}; got ...")``;
* a traced array (under ``jit``, ``grad``, ``vmap`` …) is checked only when
  ``xformjax.config`` option ``check_values`` is on: the check is then a
  ``checkify.check`` in the program, and the caller functionalizes it
  (``checkify.checkify`` or :func:`xformjax.config.checked`).

A predicate is written once for both paths as ``valid(x, xp)``, where ``xp`` is
``numpy`` (concrete) or ``jax.numpy`` (traced), e.g.
``lambda b, xp: (b > 0) & (b < 2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental import checkify

from xformjax import config

__all__ = ["check_finite", "check_values", "values_checked"]

Predicate = Callable[[Any, Any], Any]


def values_checked(x) -> bool:
    """Whether a check of ``x`` will run: always for concrete values, under a
    transformation only with ``check_values`` on."""
    return not isinstance(x, Tracer) or config.get("check_values")


def _describe(values: np.ndarray, ok: np.ndarray) -> str:
    bad = values[~ok]
    first = bad.flat[0]
    where = tuple(int(i) for i in np.argwhere(~ok)[0]) if values.ndim else ()
    shown = f"{first.item()!r}" if values.dtype.kind in "iub" else f"{float(first):.6g}"
    if values.size == 1:
        return shown
    return f"{shown} at index {where} ({bad.size} of {values.size} values fail)"


def check_values(op: str, name: str, x, valid: Predicate, expected: str) -> None:
    """Raise (or, traced, ``checkify.check``) unless ``valid(x, xp)`` holds everywhere.

    ``x`` is an array or a Python number (``None`` is skipped); the message reads
    ``"{op}: `{name}` must be {expected}; got {the first bad value and where}"``.
    """
    if x is None:
        return
    if not isinstance(x, Tracer):
        values = np.asarray(x)
        if values.size == 0:
            return
        with np.errstate(invalid="ignore"):
            ok = np.broadcast_to(np.asarray(valid(values, np), dtype=bool), values.shape)
        if not ok.all():
            raise ValueError(f"{op}: `{name}` must be {expected}; got {_describe(values, ok)}")
        return
    if not config.get("check_values") or x.size == 0:
        return
    ok = jnp.all(valid(x, jnp))
    low, high = jnp.min(x), jnp.max(x)
    checkify.check(
        ok,
        f"{op}: `{name}` must be {expected}; got values in [{{low}}, {{high}}]",
        low=low,
        high=high,
    )


def check_finite(op: str, name: str, x) -> None:
    """``x`` must hold no NaN or infinity."""
    check_values(op, name, x, lambda a, xp: xp.isfinite(a), "finite (no NaN or inf)")
