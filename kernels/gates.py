"""Chunk-local cumulative log decays as compensated (double-float) pairs.

The kernels weight token ``j`` seen from token ``i`` of the same chunk by
``e^{b_i − b_j}`` with ``b_i = Σ_{s ≤ i} g_s`` the chunk-local cumulative log decay.
In float32 one strong gate (``g = −1e4``) makes every later ``b`` about ``−1e4``, whose
ulp (1e-3) swamps the weak gates' differences. So ``b`` is kept as a pair
``b = hi + lo``: an error-free (two-sum) prefix scan, ``hi_i = fl(b_i)`` and ``lo_i``
its rounding residue. The kernels form every exponent of a difference as

    b_i − b_j = (hi_i − hi_j) + (lo_i − lo_j)

where ``hi_i − hi_j`` is exact when ``hi_i ≈ hi_j`` (Sterbenz) and ``lo`` is tiny, so
the difference is exact to float32 rounding of its own size; ``e^{b_i}`` alone takes
``hi`` (a strong gate makes it 0 either way).

Gradients: ``(hi, lo)`` moves like the plain cumulative sum ``b`` (``hi``'s tangent
is ``cumsum(ġ)``, ``lo``'s zero), so ``db`` (the kernels' cotangent of ``hi``) turns
into ``dg`` by the reverse cumulative sum inside each chunk, as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _add(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
    """Double-float ``a + b`` (operands of one sign: no cancellation between the parts)."""
    a_hi, a_lo = a
    b_hi, b_lo = b
    s = a_hi + b_hi
    v = s - a_hi
    e = (a_hi - (s - v)) + (b_hi - v)  # two-sum: s + e == a_hi + b_hi exactly
    e = e + (a_lo + b_lo)
    hi = s + e
    return hi, e - (hi - s)  # fast two-sum: |s| ≥ |e|


def compensated_prefix_sum(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` in ``x``'s dtype with ``hi + lo`` the inclusive prefix sum of ``x``
    along ``axis`` to about eps² relative (``hi`` its rounding): an associative scan of
    double-float additions. XLA keeps the two-sum: it does not re-associate
    floating-point sums. No derivative rule of its own (the callers define theirs)."""
    return jax.lax.associative_scan(_add, (x, jnp.zeros_like(x)), axis=axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def compensated_cumsum(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """:func:`compensated_prefix_sum` in float32, differentiating as the plain
    cumulative sum (``hi``'s tangent ``cumsum(ẋ)``, ``lo``'s zero)."""
    return compensated_prefix_sum(x.astype(F32), axis)


@compensated_cumsum.defjvp
def _compensated_cumsum_jvp(axis, primals, tangents):
    (x,) = primals
    (dx,) = tangents
    out = compensated_cumsum(x, axis)
    d_hi = jnp.cumsum(dx.astype(F32), axis=axis)
    return out, (d_hi, jnp.zeros_like(d_hi))
