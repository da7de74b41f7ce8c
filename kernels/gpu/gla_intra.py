"""GLA's intra-chunk scores and their gradient, by 16-row sub-chunks.

Per chunk, with ``b [C, K]`` the chunk-local cumulative log decay (its compensated
pair ``(hi, lo)``, ``gates.py``: every exponent below is a difference, formed as
``tiles.gap``)::

    A_ij = scale · Σ_c q_ic k_jc e^{b_ic − b_jc}        j ≤ i, else 0      A: [C, C]

cannot be one matmul (``e^{b_i}`` and ``e^{−b_j}`` alone may over/underflow). The
chunk is cut into sub-chunks of ``S = 16`` rows. For row block ``I`` and the
earlier columns ``j < 16 I``, with the reference row ``r = b_{16 I}`` (``b_i ≤ r ≤
b_j``, so both exponents are ≤ 0)::

    A_{I, j<16I} = (Q_I ⊙ e^{b_I − r}) (K ⊙ e^{r − b})ᵀ        (one [S, C] matmul,
                                                                 rows j ≥ 16 I masked)

and the diagonal block is built one source column ``j`` at a time from ``[S, K]``
elementwise products with masked exponents. The gradient mirrors it: given
``dA`` (the cotangent of ``A``, scale included)::

    dq_i = Σ_{j ≤ i} dA_ij k_j ⊙ e^{b_i − b_j}     dk_j = Σ_{i ≥ j} dA_ij q_i ⊙ e^{b_i − b_j}

off the diagonal block by one matmul each (``dk`` with ``r' = b_{16 I + 15}``), on
it column by column, both sharing one ``[S, K]`` exponent per column. The kernel
also forms the intra-chunk share of the decay's gradient ``q ⊙ dq − k ⊙ dk`` without
the ``i = j`` terms, which cancel exactly there (see ``gla_inter``).

Kernels: ``intra_scores`` grid ``(N·C/S, B·H)`` → ``A [B, L, H, C]`` float32;
``intra_grads`` grid ``(K/BK, N·C/S, B·H)`` → ``dq, dk`` and that share
``[B, L, H, K]`` float32 (the intra-chunk parts only).
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
    masked_exp,
)
from .specs import token_spec
from .tiles import gap, mm


def _sub_chunk_start(tiles: GLATiles, axis: int) -> jax.Array:
    """First row (inside its chunk) of this program's sub-chunk."""
    return (pl.program_id(axis) & (tiles.num_sub - 1)) * tiles.sub_chunk


def _scores_kernel(q_ref, k_ref, b_ref, lo_ref, a_ref, *, scale: float, tiles: GLATiles, bk: int):
    chunk, sub = tiles.chunk, tiles.sub_chunk
    dtype = q_ref.dtype
    start = _sub_chunk_start(tiles, 0)
    mine = pl.ds(start, sub)
    key_blocks = [pl.ds(c * bk, bk) for c in range(k_ref.shape[-1] // bk)]
    earlier = iota((chunk, bk), 0) < start  # source rows of the sub-chunks before I
    rows = iota((sub, bk), 0)
    score_cols = iota((sub, chunk), 1)
    scores = jnp.zeros((sub, chunk), F32)
    for cols in key_blocks:
        # Columns of the earlier sub-chunks: one matmul through the reference row r.
        b_mine = b_ref[mine, cols], lo_ref[mine, cols]
        r = b_ref[pl.ds(start, 1), cols], lo_ref[pl.ds(start, 1), cols]  # [1, BK] each
        q_mine = f32(q_ref[mine, cols])
        q_in = q_mine * jnp.exp(gap(*b_mine, *r))
        # ((r_hi − hi) + r_lo) − lo: as exact as ``gap``, one [C, BK] value live
        to_r = (r[0] - b_ref[:, cols]) + r[1] - lo_ref[:, cols]
        k_in = f32(k_ref[:, cols]) * masked_exp(earlier, to_r)
        scores += mm(q_in.astype(dtype), k_in.astype(dtype), trans_b=True)  # [S, C]

        # The diagonal block, one source column j at a time.
        def diagonal(j, scores, cols=cols, b_mine=b_mine, q_mine=q_mine):
            source = pl.ds(start + j, 1)
            b_j = b_ref[source, cols], lo_ref[source, cols]
            decay = masked_exp(rows >= j, gap(b_mine[0], b_mine[1], *b_j))
            products = q_mine * f32(k_ref[source, cols]) * decay
            column = jnp.sum(products, axis=1, keepdims=True)  # [S, 1]
            return jnp.where(score_cols == start + j, scores + column, scores)

        scores = jax.lax.fori_loop(i32(0), i32(sub), diagonal, scores)
    a_ref[...] = scores * scale


def intra_scores(
    q: jax.Array,
    k: jax.Array,
    b: tuple[jax.Array, jax.Array],
    *,
    scale: float,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> jax.Array:
    """``q, k [B, L, H, K]``, ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H, K]`` →
    ``A [B, L, H, C]`` float32
    (row ``t`` holds token ``t``'s scores against its chunk; zero above the diagonal)."""
    batch, length, heads, key_width = q.shape
    chunk, sub, num_sub = tiles.chunk, tiles.sub_chunk, tiles.num_sub
    bk = block(key_width, tiles.block_k)
    chunk_tile = token_spec(chunk, key_width, heads, lambda s, bh: (bh, s // num_sub, 0))
    return pl.pallas_call(
        lambda *refs: _scores_kernel(*refs, scale=scale, tiles=tiles, bk=bk),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, chunk), F32),
        grid=(length // sub, batch * heads),
        in_specs=[chunk_tile] * 4,
        out_specs=token_spec(sub, chunk, heads, lambda s, bh: (bh, s, 0)),
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name="gla_fwd_intra",
    )(q, k, *b)


def _grads_kernel(q_ref, k_ref, b_ref, lo_ref, da_ref, dq_ref, dk_ref, xg_ref, *, tiles: GLATiles):
    chunk, sub = tiles.chunk, tiles.sub_chunk
    dtype = q_ref.dtype
    bk = q_ref.shape[-1]
    start = _sub_chunk_start(tiles, 1)
    end = start + sub - 1
    mine = pl.ds(start, sub)
    b_all = b_ref[...], lo_ref[...]
    b_in = b_ref[mine, :], lo_ref[mine, :]
    chunk_rows = iota((chunk, bk), 0)

    # Sub-chunks before I (dq) and after I (dk), one matmul each.
    r = b_ref[pl.ds(start, 1), :], lo_ref[pl.ds(start, 1), :]
    k_in = f32(k_ref[...]) * masked_exp(chunk_rows < start, gap(*r, *b_all))
    dq = mm(da_ref[mine, :].astype(dtype), k_in.astype(dtype)) * jnp.exp(gap(*b_in, *r))
    r_end = b_ref[pl.ds(end, 1), :], lo_ref[pl.ds(end, 1), :]
    q_in = f32(q_ref[...]) * masked_exp(chunk_rows > end, gap(*b_all, *r_end))
    dk = mm(da_ref[:, mine].astype(dtype), q_in.astype(dtype), trans_a=True)
    dk = dk * jnp.exp(gap(*r_end, *b_in))

    # The diagonal block, one source column j at a time, without its diagonal (i = j):
    # q_i ⊙ dA_ii k_i and k_i ⊙ dA_ii q_i cancel exactly in the decay's gradient, so they
    # join dq and dk only after its share is formed (else float32 rounding of two equal
    # O(1) terms would swamp a small gate gradient).
    q_mine = f32(q_ref[mine, :])
    rows = iota((sub, bk), 0)

    def diagonal(j, carry):
        dq, dk = carry
        source = pl.ds(start + j, 1)
        b_j = b_ref[source, :], lo_ref[source, :]
        decay = masked_exp(rows > j, gap(*b_in, *b_j))  # e^{b_i − b_j}, i > j
        weights = da_ref[mine, source] * decay  # [S, BK]: dA_ij e^{b_i − b_j}
        dq = dq + weights * f32(k_ref[source, :])
        dk_j = jnp.sum(weights * q_mine, axis=0, keepdims=True)  # [1, BK]
        dk = jnp.where(rows == j, dk + dk_j, dk)
        return dq, dk

    dq, dk = jax.lax.fori_loop(i32(0), i32(sub - 1), diagonal, (dq, dk))
    k_mine = f32(k_ref[mine, :])
    xg_ref[...] = q_mine * dq - k_mine * dk
    eye = iota((sub, sub), 0) == iota((sub, sub), 1)
    da_diagonal = jnp.sum(jnp.where(eye, da_ref[mine, mine], 0.0), axis=1, keepdims=True)
    dq_ref[...] = dq + da_diagonal * k_mine
    dk_ref[...] = dk + da_diagonal * q_mine


def intra_grads(
    q: jax.Array,
    k: jax.Array,
    b: tuple[jax.Array, jax.Array],
    d_scores: jax.Array,
    *,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k [B, L, H, K]``, ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H, K]``,
    ``d_scores [B, L, H, C]`` float32 (``dA``, causal) →
    the intra-chunk ``(dq, dk, x)``, ``[B, L, H, K]`` float32, with ``x = q ⊙ dq − k ⊙ dk``
    formed without the ``i = j`` terms (the intra-chunk share of the decay's gradient,
    before its reverse cumulative sum; see ``gla_inter``)."""
    batch, length, heads, key_width = q.shape
    chunk, sub, num_sub = tiles.chunk, tiles.sub_chunk, tiles.num_sub
    bk = block(key_width, tiles.block_k)
    chunk_tile = token_spec(chunk, bk, heads, lambda kb, s, bh: (bh, s // num_sub, kb))
    grad_tile = token_spec(sub, bk, heads, lambda kb, s, bh: (bh, s, kb))
    shape = jax.ShapeDtypeStruct((batch, length, heads, key_width), F32)
    return pl.pallas_call(
        lambda *refs: _grads_kernel(*refs, tiles=tiles),
        out_shape=(shape, shape, shape),
        grid=(key_width // bk, length // sub, batch * heads),
        in_specs=[
            chunk_tile,
            chunk_tile,
            chunk_tile,
            chunk_tile,
            token_spec(chunk, chunk, heads, lambda kb, s, bh: (bh, s // num_sub, 0)),
        ],
        out_specs=(grad_tile, grad_tile, grad_tile),
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name="gla_bwd_intra",
    )(q, k, *b, d_scores)
