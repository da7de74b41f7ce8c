"""Library-wide switches, set like JAX's own: ``xformjax.config.update(name, value)``.

``check_values`` (default off; ``XFORMJAX_CHECK_VALUES=1`` in the environment turns it
on at import) makes the value checks of the ops and the language model work under
``jax.jit``, ``jax.grad`` and the other transformations, where arrays hold no values
while the program is traced:

* outside a transformation (concrete arrays) the checks always run and raise
  ``ValueError`` at once: a positive log-gate, β outside [0, 2], a token outside the
  vocabulary, ``cu_seqlens`` that do not end at ``T`` …;
* under ``jit`` they cost nothing by default: nothing is checked;
* with ``check_values`` on, each check becomes a :func:`jax.experimental.checkify.check`
  in the traced program. JAX then requires the program to be *functionalized* by
  ``checkify.checkify`` (it says so when it is not), which returns the error beside
  the outputs; :func:`checked` does that and raises it::

      import xformjax
      from xformjax import ops

      xformjax.config.update("check_values", True)
      step = xformjax.config.checked(jax.jit(lambda q, k, v, g: ops.linear_attention(
          q, k, v, g=g)[0]))
      step(q, k, v, g)   # raises ValueError: linear_attention: `g` holds log decays ...

The choice is made while a function is traced, and JAX caches traces: :func:`update`
clears those caches (``jax.clear_caches()``), so a function traced before the switch
is traced again after it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.experimental import checkify

__all__ = ["checked", "checked_if_on", "get", "override", "update"]

_ENV = {"check_values": "XFORMJAX_CHECK_VALUES"}


def _from_env(name: str) -> bool:
    raw = os.environ.get(_ENV[name], "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{_ENV[name]} must be 0/1 (or true/false, yes/no, on/off); got {raw!r}")


_VALUES: dict[str, bool] = {name: _from_env(name) for name in _ENV}


def _check_name(name: str) -> None:
    if name not in _VALUES:
        raise ValueError(f"unknown xformjax option {name!r}; the options are {sorted(_VALUES)}")


def get(name: str) -> bool:
    """The current value of option ``name`` (``"check_values"``)."""
    _check_name(name)
    return _VALUES[name]


def update(name: str, value: bool) -> None:
    """Set option ``name`` to ``value`` (a bool) and clear JAX's trace caches."""
    _check_name(name)
    if not isinstance(value, bool):
        raise TypeError(f"xformjax option {name!r} takes a bool; got {value!r}")
    if _VALUES[name] != value:
        _VALUES[name] = value
        jax.clear_caches()


@contextlib.contextmanager
def override(name: str, value: bool) -> Iterator[None]:
    """Set option ``name`` inside the block and restore it after (tests, one-off runs)."""
    previous = get(name)
    update(name, value)
    try:
        yield
    finally:
        update(name, previous)


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` functionalized by ``checkify`` for the library's value checks; a failed
    check raises ``ValueError`` with the check's message.

    The checks are in the traced program only while ``check_values`` is on (see the
    module docstring); ``fn`` may be jitted or not, and may take gradients inside.
    """
    functionalized = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = functionalized(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise ValueError(message.removesuffix(" (`check` failed)"))
        return out

    return run


def checked_if_on(fn: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`checked` ``fn`` while ``check_values`` is on, else ``fn`` itself.

    The library's own jitted entry points (the trainer's steps, ``generate``) go
    through this when they are built, so turning the switch on before a run is all it
    takes to check its values; off, they run as they are, at no cost.
    """
    return checked(fn) if get("check_values") else fn
