"""Scores under a per-channel decay, with a hand-written VJP.

Inside one chunk, with ``b`` the per-channel log decay accumulated from the
chunk start (``[.., C, K]``)::

    A_ij = Σ_k x_ik y_jk exp(b_ik − b_jk)   for j ≤ i,   0 above the diagonal.

It is ``Q Kᵀ`` under a gate per key channel (the intra-chunk scores of GLA and
KDA, and KDA's ``K Kᵀ``). The ``[C, C, K]`` decay tensor is never formed whole:

- across sub-chunks of ``s = gcd(C, 16)`` rows, through the log decay ``r`` just
  before the row's sub-chunk: ``exp(b_i − b_j) = exp(b_i − r)·exp(r − b_j)``,
  both factors ≤ 1 wherever the mask lets them through, so one matmul per
  sub-chunk;
- inside a sub-chunk, exactly: one ``[s, K]`` slab of ``exp(b_i − b_j)`` per
  column ``j`` (masked before ``exp``).

Backward: ``dx_ik = Σ_j dA_ij y_jk E_ijk`` and ``dy_jk = Σ_i dA_ij x_ik E_ijk``
split the same way (matmuls across sub-chunks; inside, a matrix-vector product
per row for ``dx`` and per column for ``dy``), and since ``b`` enters only
through ``b_ik − b_jk``, ``db = x ⊙ dx − y ⊙ dy``, with the diagonal ``i = j``
(decay 1) left out of both: it cancels exactly, and in float32 its rounding
would swamp ``db`` under strong decay. Every sum is a dot product:
XLA:CPU runs reductions over a kept axis, and JAX's own VJP of the broadcast
factors, several times slower (a chunked KDA forward+backward at 4K tokens took
1.6× as long with them: 183 vs 114 ms).

Precision: ``b`` comes as the compensated pair ``hi + lo`` of
:func:`.chunk_algebra.log_decays`, and every ``b_i − b_j`` (``r`` included) is
formed as ``(hi_i − hi_j) + (lo_i − lo_j)``, so a strong gate earlier in the
chunk costs the weak ones after it no precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp

SUB_CHUNK = 16


def _split(x: jax.Array, sub: int) -> jax.Array:
    """``[.., C, K]`` → ``[.., C/sub, sub, K]``."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] // sub, sub, x.shape[-1]))


#: ``b`` as the compensated pair ``(hi, lo)``.
Pair = tuple[jax.Array, jax.Array]


def _each(fn: Callable[[jax.Array], jax.Array], pair: Pair) -> Pair:
    """``fn`` applied to both parts of a pair."""
    return fn(pair[0]), fn(pair[1])


def _difference(a: Pair, b: Pair) -> jax.Array:
    """``a − b`` of two ``(hi, lo)`` pairs, high parts first (exact when close)."""
    return (a[0] - b[0]) + (a[1] - b[1])


def _factors(b: Pair, sub: int) -> tuple[jax.Array, jax.Array]:
    """``(row, column)`` decay factors across sub-chunks.

    ``row[.., s, i, K] = exp(b_i − r_s)`` for row ``i`` of sub-chunk ``s``;
    ``column[.., s, j, K] = exp(r_s − b_j)`` for every ``j`` before sub-chunk
    ``s``, 0 elsewhere (masked before ``exp``); ``r_s`` is ``b`` just before
    sub-chunk ``s`` (0 for the first).
    """
    size = b[0].shape[-2]
    blocks = _each(lambda x: _split(x, sub), b)
    ref = _each(
        lambda x: jnp.concatenate([jnp.zeros_like(x[..., :1, -1, :]), x[..., :-1, -1, :]], axis=-2),
        blocks,
    )  # [.., n, K]
    row = jnp.exp(_difference(blocks, _each(lambda r: r[..., None, :], ref)))
    earlier = jnp.arange(size)[None, :] < (jnp.arange(size // sub) * sub)[:, None]  # [n, C]
    column_log = _difference(
        _each(lambda r: r[..., :, None, :], ref), _each(lambda x: x[..., None, :, :], b)
    )
    return row, jnp.exp(jnp.where(earlier[..., None], column_log, -jnp.inf))


def _take(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``x``'s slice ``index`` (traced) along ``axis`` (counted from the end), dropped."""
    return jax.lax.dynamic_index_in_dim(x, index, axis=x.ndim + axis, keepdims=False)


def _column_slab(b_blocks: Pair, column: jax.Array) -> jax.Array:
    """``exp(b_i − b_j)`` for ``j = column`` and every row ``i ≥ j`` of each
    sub-chunk, 0 for ``i < j``: ``[.., n, sub, K]``."""
    sub = b_blocks[0].shape[-2]
    below = (jnp.arange(sub) >= column)[:, None]
    log_decay = _difference(b_blocks, _each(lambda x: _take(x, column, -2)[..., None, :], b_blocks))
    return jnp.exp(jnp.where(below, log_decay, -jnp.inf))


def _row_slab(b_blocks: Pair, row: jax.Array) -> jax.Array:
    """``exp(b_i − b_j)`` for ``i = row`` and every column ``j ≤ i`` of each
    sub-chunk, 0 for ``j > i``: ``[.., n, sub, K]``."""
    sub = b_blocks[0].shape[-2]
    before = (jnp.arange(sub) <= row)[:, None]
    log_decay = _difference(_each(lambda x: _take(x, row, -2)[..., None, :], b_blocks), b_blocks)
    return jnp.exp(jnp.where(before, log_decay, -jnp.inf))


def _block_diagonal(blocks: jax.Array) -> jax.Array:
    """``[.., n, s, s]`` diagonal blocks → the ``[.., n·s, n·s]`` matrix."""
    count, sub = blocks.shape[-3], blocks.shape[-1]
    full = jnp.einsum("...sij,st->...sitj", blocks, jnp.eye(count, dtype=blocks.dtype))
    return full.reshape(blocks.shape[:-3] + (count * sub, count * sub))


def diagonal_blocks(x: jax.Array, sub: int) -> jax.Array:
    """``[.., n·s, n·s]`` → its ``n`` diagonal ``[s, s]`` blocks ``[.., n, s, s]``."""
    count = x.shape[-1] // sub
    x = x.reshape(x.shape[:-2] + (count, sub, count, sub))
    return jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)


def _forward(x: jax.Array, y: jax.Array, b: Pair) -> jax.Array:
    size = x.shape[-2]
    sub = math.gcd(size, SUB_CHUNK)
    xs, ys = (_split(a, sub) for a in (x, y))
    bs = _each(lambda a: _split(a, sub), b)
    row, column = _factors(b, sub)
    across = jnp.einsum("...sik,...sjk->...sij", xs * row, y[..., None, :, :] * column)
    # One column j of every diagonal block per step: a loop rather than unrolled,
    # which compiled 4x slower.
    columns = jax.lax.map(
        lambda j: jnp.einsum("...ik,...k->...i", xs * _column_slab(bs, j), _take(ys, j, -2)),
        jnp.arange(sub),
    )
    diagonal = jnp.moveaxis(columns, 0, -1)  # [.., n, s(i), s(j)]
    return across.reshape(x.shape[:-1] + (size,)) + _block_diagonal(diagonal)


@jax.custom_vjp
def _pair_scores(x: jax.Array, y: jax.Array, b_hi: jax.Array, b_lo: jax.Array) -> jax.Array:
    return _forward(x, y, (b_hi, b_lo))


def channel_gate_scores(
    x: jax.Array, y: jax.Array, b: jax.Array, b_lo: jax.Array | None = None
) -> jax.Array:
    """``A_ij = Σ_k x_ik y_jk exp(b_ik − b_jk)`` for ``j ≤ i`` (0 above).

    Args:
      x, y: ``[.., C, K]``; b: ``[.., C, K]`` log decay accumulated over the chunk
        (non-increasing along C for decaying gates; any real values are exact
        where ``exp(b_i − b_j)`` is representable); b_lo: the low part when ``b``
        is a compensated pair ``b + b_lo`` (``None``: 0). Its cotangent equals
        ``b``'s.

    Returns:
      ``[.., C, C]``, lower-triangular including the diagonal.
    """
    return _pair_scores(x, y, b, jnp.zeros_like(b) if b_lo is None else b_lo)


def _pair_scores_fwd(x, y, b_hi, b_lo):
    return _forward(x, y, (b_hi, b_lo)), (x, y, b_hi, b_lo)


def _pair_scores_bwd(residuals, d_scores):
    x, y, b_hi, b_lo = residuals
    size = x.shape[-2]
    sub = math.gcd(size, SUB_CHUNK)
    count = size // sub
    xs, ys = (_split(a, sub) for a in (x, y))
    bs = _each(lambda a: _split(a, sub), (b_hi, b_lo))
    row, column = _factors((b_hi, b_lo), sub)
    d_rows = _split(d_scores, sub)  # [.., n, s, C]: the rows of each sub-chunk
    # Across sub-chunks (column is 0 where j is not before the sub-chunk).
    dx = jnp.einsum("...sij,...sjk->...sik", d_rows, y[..., None, :, :] * column) * row
    d_column = jnp.einsum("...sij,...sik->...sjk", d_rows, xs * row) * column  # [.., n, C, K]
    # (count ≥ 1, so the `sum`, typed `Array | Literal[0]`, is an array)
    dy = _split(cast(jax.Array, sum(d_column[..., s, :, :] for s in range(count))), sub)
    # Inside each sub-chunk: a matrix-vector product per row i (dx) and per column
    # j (dy), strictly below the diagonal. (Products accumulated element-wise
    # instead get fused by XLA:CPU into the consumer's transposing write, which
    # then runs several times slower.)
    d_diagonal = jnp.tril(diagonal_blocks(d_scores, sub), -1)  # [.., n, s, s]

    def row_and_column(index):
        dx_row = jnp.einsum(
            "...j,...jk->...k", _take(d_diagonal, index, -2), ys * _row_slab(bs, index)
        )
        dy_column = jnp.einsum(
            "...i,...ik->...k", _take(d_diagonal, index, -1), xs * _column_slab(bs, index)
        )
        return dx_row, dy_column

    dx_rows, dy_columns = jax.lax.map(row_and_column, jnp.arange(sub))
    dx = (dx + jnp.moveaxis(dx_rows, 0, -2)).reshape(x.shape)
    dy = (dy + jnp.moveaxis(dy_columns, 0, -2)).reshape(y.shape)
    db = x * dx - y * dy  # the diagonal (decay 1) cancels: left out of both
    on_diagonal = jnp.diagonal(d_scores, axis1=-2, axis2=-1)[..., None]  # [.., C, 1]
    return dx + on_diagonal * y, dy + on_diagonal * x, db, db


_pair_scores.defvjp(_pair_scores_fwd, _pair_scores_bwd)
