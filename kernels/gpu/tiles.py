"""In-kernel helpers shared by the GPU kernels: matmuls with the right precision, masks, loops.

Every ``mm`` keeps its operands in their dtype (bf16/f16 go to the tensor cores;
float32 operands may use TF32, ``jax.lax.Precision.DEFAULT``) and accumulates
in float32. Masks are built from ``broadcasted_iota`` and applied *before*
``exp`` so that no masked exponent can overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` in float32, ``op`` a transpose where asked; ``a`` and ``b`` share
    a dtype (cast the float32 one down before calling)."""
    contract_a = 0 if trans_a else 1
    contract_b = 1 if trans_b else 0
    return jax.lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        precision=jax.lax.Precision.DEFAULT,
        preferred_element_type=F32,
    )


def row_ids(rows: int, cols: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)


def col_ids(rows: int, cols: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)


def causal_mask(size: int, *, strict: bool = False) -> jax.Array:
    """``[size, size]`` booleans: ``j ≤ i`` (``j < i`` when ``strict``)."""
    i, j = row_ids(size, size), col_ids(size, size)
    return j < i if strict else j <= i


def gap(hi_i: jax.Array, lo_i: jax.Array, hi_j: jax.Array, lo_j: jax.Array) -> jax.Array:
    """``b_i − b_j`` of compensated pairs ``b = hi + lo`` (``gates.py``): ``hi_i − hi_j``
    is exact when ``hi_i ≈ hi_j``, so a strong gate before both costs no precision."""
    return (hi_i - hi_j) + (lo_i - lo_j)


def loop(num: int, body, init):
    """``fori_loop`` over ``0 … num − 1`` with int32 bounds (also under ``jax_enable_x64``)."""
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(num), body, init)


def block_slice(i, block: int):
    """The ``i``-th ``block``-wide slice (``i`` a traced loop index)."""
    return pl.ds(pl.multiple_of(i * block, block), block)


def last(b: jax.Array) -> jax.Array:
    """The last entry of ``b [C]`` as a scalar (a masked sum: no dynamic index)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, b.shape, 0)
    return jnp.sum(jnp.where(rows == b.shape[0] - 1, b, 0.0))


def decay(
    b: tuple[jax.Array, jax.Array] | None, size: int, *, transposed: bool = False
) -> jax.Array:
    """``Γ_ij = e^{b_i − b_j} [j ≤ i]`` (``Γᵀ`` when ``transposed``) float32 ``[C, C]`` for
    the scalar chunk-local log decay ``b [C]`` given as its compensated pair ``(hi, lo)``
    (:func:`gap`); the 0/1 causal mask without a gate (``b is None``)."""
    mask = causal_mask(size)
    if transposed:
        mask = ~causal_mask(size, strict=True)  # j ≤ i with j the row
    if b is None:
        return jnp.where(mask, 1.0, 0.0).astype(F32)
    hi, lo = b
    # ((hi_i − hi_j) + lo_i) − lo_j: as exact as ``gap``, with one [C, C] value live
    if transposed:
        diff = (hi[None, :] - hi[:, None]) + lo[None, :] - lo[:, None]
    else:
        diff = (hi[:, None] - hi[None, :]) + lo[:, None] - lo[None, :]
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))
