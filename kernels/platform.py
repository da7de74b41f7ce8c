"""Which kernel flavour runs where, decided when the program is lowered.

``on_platforms(fn, *arrays)`` wraps ``fn(*arrays, target=..., interpret=...)``
in ``jax.lax.platform_dependent``: a jitted call traced on any host lowers to
the Mosaic kernel for ``("tpu",)``, the Triton kernel for ``("cuda",)`` /
``("rocm",)`` and the interpreted kernel only for ``("cpu",)`` — so programs
compiled ahead of time for a TPU from a CPU host get the real kernel.

Tests pin a flavour instead (``target`` and ``interpret`` given explicitly):
``target="gpu", interpret=True`` is Pallas' generic interpreter and
``target="tpu", interpret=True`` the TPU interpreter (``pltpu.InterpretParams``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from .config import Target


def on_platforms(
    fn: Callable,
    *arrays,
    target: Target | None = None,
    interpret: bool | None = None,
    cpu: Callable | None = None,
):
    """Call ``fn`` with the flavour of the platform it is lowered for (or the pinned one).

    ``cpu``, when given, replaces the interpreted kernel in the CPU lowering (the
    ops pass their XLA form when the kernel was chosen by default, not asked for).
    """
    if target is not None:
        return fn(*arrays, target=target, interpret=bool(interpret))
    if interpret:
        return fn(*arrays, target="gpu", interpret=True)
    gpu = functools.partial(fn, target="gpu", interpret=False)
    return jax.lax.platform_dependent(
        *arrays,
        cpu=cpu if cpu is not None else functools.partial(fn, target="gpu", interpret=True),
        tpu=functools.partial(fn, target="tpu", interpret=False),
        cuda=gpu,
        rocm=gpu,
    )
