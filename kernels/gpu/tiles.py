"""In-kernel helpers shared by the GPU kernels: matmuls with the right precision, masks.

Every ``mm`` keeps its operands in their dtype (bf16/f16 go to the tensor cores;
float32 operands may use TF32, ``jax.lax.Precision.DEFAULT``) and accumulates
in float32. Masks are built from ``broadcasted_iota`` and applied *before*
``exp`` so that no masked exponent can overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def decay_matrix(b_rows: jax.Array, b_cols: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(b_i − b_j)`` where ``mask``, else 0: ``b_rows [C, 1]``, ``b_cols [1, C]``
    float32 chunk-local cumulative log decays (masked before the ``exp``)."""
    return jnp.exp(jnp.where(mask, b_rows - b_cols, -jnp.inf))
