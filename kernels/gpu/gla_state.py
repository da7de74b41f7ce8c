"""The two sequential GLA kernels: the state recurrence and its reverse, per-channel decay.

Forward (``state_forward``), per chunk ``n`` with ``b`` its chunk-local
cumulative log decay ``[C, K]`` and ``b_last`` its last row::

    h_{n+1} = diag(e^{b_last}) h_n + (K ⊙ e^{b_last − b})ᵀ V          h: [K, V]

Backward (``state_backward``), with ``dh_n`` the cotangent of the state *leaving*
chunk ``n`` (``dh_{N−1}`` = the final state's)::

    dh_{n−1} = diag(e^{b_last}) dh_n + scale · (Q ⊙ e^{b})ᵀ dO

Grid ``(V/BV, K/BK, B·H)``: each program owns a ``[BK, BV]`` float32 tile of the
state (channels decay independently, so K tiles too) and walks the chunks.
Written per chunk, in the input dtype: ``h [B, N, H, K, V]`` (the state entering
chunk ``n``) or ``dh [B, N, H, K, V]`` (the cotangent of the state leaving it);
the final state / initial-state cotangent come out in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .gla_common import (
    F32,
    TILES,
    GLATiles,
    as_column,
    block,
    compiler_params,
    f32,
    i32,
)
from .specs import chunk_state_spec, state_spec, token_spec
from .tiles import gap, mm


def _state_kernel(
    x_ref,
    y_ref,
    b_ref,
    *refs,
    chunk: int,
    num_chunks: int,
    scale: float,
    reverse: bool,
):
    """Forward: ``x = k``, ``y = v``, adds ``(x ⊙ e^{b_last − b})ᵀ y``; reverse:
    ``x = q``, ``y = dO``, adds ``scale · (x ⊙ e^{b})ᵀ y``. ``b_ref`` holds ``hi`` of the
    compensated pair; the forward also takes ``lo`` (the next ref) for ``b_last − b``."""
    lo_ref = None if reverse else refs[0]
    s0_ref, states_ref, final_ref = refs[-3:]
    dtype = x_ref.dtype

    def body(i, state):
        n = num_chunks - 1 - i if reverse else i
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        states_ref[n] = state.astype(states_ref.dtype)
        b = b_ref[rows, :]
        b_last = b_ref[pl.ds(n * chunk + chunk - 1, 1), :]  # [1, BK]
        if lo_ref is None:
            weighted = f32(x_ref[rows, :]) * (scale * jnp.exp(b))
        else:
            lo_last = lo_ref[pl.ds(n * chunk + chunk - 1, 1), :]
            weighted = f32(x_ref[rows, :]) * jnp.exp(gap(b_last, lo_last, b, lo_ref[rows, :]))
        update = mm(weighted.astype(dtype), y_ref[rows, :], trans_a=True)  # [BK, BV]
        return as_column(jnp.exp(b_last)) * state + update

    final = jax.lax.fori_loop(i32(0), i32(num_chunks), body, s0_ref[...].astype(F32))
    final_ref[...] = final


def _state_call(x, y, gate, s0, *, scale, reverse, tiles, interpret, name):
    """``gate``: ``(hi, lo)`` of ``b`` forward, ``(hi,)`` in reverse (only ``e^{b}``)."""
    batch, length, heads, key_width = x.shape
    value_width = y.shape[-1]
    chunk = tiles.chunk
    num_chunks = length // chunk
    bk = block(key_width, tiles.state_block_k)
    bv = block(value_width, tiles.state_block_v)
    kernel = lambda *refs: _state_kernel(
        *refs, chunk=chunk, num_chunks=num_chunks, scale=scale, reverse=reverse
    )
    key_spec = token_spec(length, bk, heads, lambda vb, kb, bh: (bh, 0, kb))
    value_spec = token_spec(length, bv, heads, lambda vb, kb, bh: (bh, 0, vb))
    tile_spec = state_spec(bk, bv, heads, lambda vb, kb, bh: (bh, kb, vb))
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_chunks, heads, key_width, value_width), x.dtype),
            jax.ShapeDtypeStruct((batch, heads, key_width, value_width), F32),
        ),
        grid=(value_width // bv, key_width // bk, batch * heads),
        in_specs=[key_spec, value_spec] + [key_spec] * len(gate) + [tile_spec],
        out_specs=(
            chunk_state_spec(num_chunks, bk, bv, heads, lambda vb, kb, bh: (bh, 0, kb, vb)),
            tile_spec,
        ),
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name=name,
    )(x, y, *gate, s0)


def state_forward(
    k: jax.Array,
    v: jax.Array,
    b: tuple[jax.Array, jax.Array],
    h0: jax.Array,
    *,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``k [B, L, H, K]``, ``v [B, L, H, V]``, ``b`` the compensated pair ``(hi, lo)`` of float32
    ``[B, L, H, K]``, ``h0 [B, H, K, V]`` float32 → ``(h [B, N, H, K, V]`` entering states
    in ``k.dtype``, final state float32)."""
    return _state_call(
        k,
        v,
        tuple(b),
        h0,
        scale=1.0,
        reverse=False,
        tiles=tiles,
        interpret=interpret,
        name="gla_fwd_h",
    )


def state_backward(
    q: jax.Array,
    d_out: jax.Array,
    b: tuple[jax.Array, jax.Array],
    d_final: jax.Array,
    *,
    scale: float,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``q [B, L, H, K]``, ``d_out [B, L, H, V]`` (same dtype), ``b``, ``d_final [B, H, K, V]``
    float32 → ``(dh [B, N, H, K, V]`` cotangents of the chunk-leaving states in
    ``q.dtype``, the initial state's cotangent float32)."""
    return _state_call(
        q,
        d_out,
        (b[0],),
        d_final,
        scale=scale,
        reverse=True,
        tiles=tiles,
        interpret=interpret,
        name="gla_bwd_dh",
    )
