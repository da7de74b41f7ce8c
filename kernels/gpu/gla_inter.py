"""GLA's inter-chunk query/key gradients and the gradient of the per-token log decays.

Per chunk ``n`` (``b [C, K]`` chunk-local cumulative log decay, ``h_n`` the state
entering it, ``dh_n`` the cotangent of the state leaving it, ``dq°, dk°, x°`` from
``gla_intra.intra_grads``)::

    dQ = dq° + scale · (dO h_nᵀ) ⊙ e^{b}
    dK = dk° + (V dh_nᵀ) ⊙ e^{b_last − b}

``b_i`` enters as ``e^{+b_i}`` on the query side (every ``dQ`` term) and
``e^{−b_j}`` on the key side (every ``dK`` term); ``b_last`` also decays the state
and every key in ``h_{n+1}``. So the cotangent of ``b`` is::

    db = Q ⊙ dQ − K ⊙ dK + [last row] ( Σ_j y_j + e^{b_last} ⊙ rowsum(h_n ⊙ dh_n) )
    y  = K ⊙ (V dh_nᵀ) ⊙ e^{b_last − b}

and that of the per-token log decay ``g_s`` (``b_t = Σ_{s ≤ t} g_s`` in the chunk)
its reverse cumulative sum, computed here without cancelling large terms::

    dg_s = Σ_{t ≥ s} x_t + Σ_{j < s} y_j + e^{b_last} ⊙ rowsum(h_n ⊙ dh_n)
    x    = x° + Q ⊙ scale · (dO h_nᵀ) ⊙ e^{b}

with ``x° = q ⊙ dq° − k ⊙ dk°`` less the intra-chunk ``i = j`` terms. Those terms are
equal in ``Q ⊙ dQ`` and ``K ⊙ dK``, and the ``y`` terms of ``t ≥ s`` cancel against
``Σ_j y_j``: both are left out instead of subtracted after rounding (under strong
decay they are O(1) while ``dg`` is tiny). The two sums are triangular ``[C, C]``
matmuls to float32 accuracy (``masked_sum``). Grid ``(K/BK, N, B·H)``, looping over
value tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .gla_common import (
    F32,
    TILES,
    GLATiles,
    block,
    compiler_params,
    f32,
    i32,
    iota,
    masked_sum,
)
from .specs import chunk_state_spec, token_spec
from .tiles import gap, mm


def _inter_kernel(
    q_ref,
    k_ref,
    b_ref,
    lo_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    dq_in_ref,
    dk_in_ref,
    x_in_ref,
    dq_ref,
    dk_ref,
    dg_ref,
    *,
    scale: float,
    bv: int,
):
    chunk, bk = q_ref.shape
    num_value_blocks = v_ref.shape[-1] // bv
    b_last = b_ref[pl.ds(chunk - 1, 1), :]  # [1, BK]

    def value_block(c):
        return pl.ds(pl.multiple_of(c * bv, bv), bv)

    # Queries first (its accumulator dies before the keys' is born).
    def query_step(c, acc):
        cols = value_block(c)
        return acc + mm(do_ref[:, cols], h_ref[:, cols], trans_b=True)

    dq_inter = jax.lax.fori_loop(
        i32(0), i32(num_value_blocks), query_step, jnp.zeros((chunk, bk), F32)
    )
    dq_inter = dq_inter * (scale * jnp.exp(b_ref[...]))
    dq_ref[...] = (dq_in_ref[...] + dq_inter).astype(dq_ref.dtype)
    x = x_in_ref[...] + f32(q_ref[...]) * dq_inter

    def key_step(c, carry):
        acc, state_term = carry
        cols = value_block(c)
        h, dh = h_ref[:, cols], dh_ref[:, cols]
        acc = acc + mm(v_ref[:, cols], dh, trans_b=True)
        return acc, state_term + jnp.sum(f32(h) * f32(dh), axis=1)

    dk_inter, state_term = jax.lax.fori_loop(
        i32(0),
        i32(num_value_blocks),
        key_step,
        (jnp.zeros((chunk, bk), F32), jnp.zeros((bk,), F32)),
    )
    lo_last = lo_ref[pl.ds(chunk - 1, 1), :]
    dk_inter = dk_inter * jnp.exp(gap(b_last, lo_last, b_ref[...], lo_ref[...]))
    dk_ref[...] = (dk_in_ref[...] + dk_inter).astype(dk_ref.dtype)
    y = f32(k_ref[...]) * dk_inter
    rows, cols = iota((chunk, chunk), 0), iota((chunk, chunk), 1)
    dg = masked_sum(cols >= rows, x) + masked_sum(cols < rows, y)  # Σ_{t ≥ s} x_t + Σ_{j < s} y_j
    dg_ref[...] = dg + jnp.exp(b_last) * state_term[None, :]


def inter_grads(
    q: jax.Array,
    k: jax.Array,
    b: tuple[jax.Array, jax.Array],
    v: jax.Array,
    d_out: jax.Array,
    h: jax.Array,
    dh: jax.Array,
    dq_intra: jax.Array,
    dk_intra: jax.Array,
    x_intra: jax.Array,
    *,
    scale: float,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k [B, L, H, K]``, ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H, K]``,
    ``v, d_out [B, L, H, V]``, ``h, dh [B, N, H, K, V]``, the
    intra-chunk ``dq_intra, dk_intra, x_intra`` float32 (``gla_intra.intra_grads``) →
    ``(dq, dk`` in ``q.dtype``, ``dg`` float32 ``[B, L, H, K])``, ``dg`` the cotangent
    of the per-token log decays whose chunk-local cumulative sum is ``b``."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    chunk = tiles.chunk
    bk = block(key_width, tiles.block_k)
    bv = block(value_width, tiles.inter_block_v)
    key_tile = token_spec(chunk, bk, heads, lambda kb, n, bh: (bh, n, kb))
    value_tile = token_spec(chunk, value_width, heads, lambda kb, n, bh: (bh, n, 0))
    state_tile = chunk_state_spec(None, bk, value_width, heads, lambda kb, n, bh: (bh, n, kb, 0))
    grads = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        lambda *refs: _inter_kernel(*refs, scale=scale, bv=bv),
        out_shape=(grads, grads, jax.ShapeDtypeStruct(q.shape, F32)),
        grid=(key_width // bk, length // chunk, batch * heads),
        in_specs=[
            key_tile,
            key_tile,
            key_tile,
            key_tile,
            value_tile,
            value_tile,
            state_tile,
            state_tile,
            key_tile,
            key_tile,
            key_tile,
        ],
        out_specs=(key_tile, key_tile, key_tile),
        compiler_params=compiler_params(tiles, tiles.inter_warps),
        interpret=interpret,
        name="gla_bwd_dqk",
    )(q, k, *b, v, d_out, h, dh, dq_intra, dk_intra, x_intra)
