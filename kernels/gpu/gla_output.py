"""GLA's chunk-parallel output kernel and the value-side backward kernels.

Per chunk ``n`` (``b [C, K]`` chunk-local cumulative log decay, ``h_n`` the state
entering it, ``A`` the intra-chunk scores with the scale inside, ``dh_n`` the
cotangent of the state leaving it)::

    O  = scale · (Q ⊙ e^{b}) h_n + A V                              (output)
    dA = scale · tril(dO Vᵀ)                                       (d_scores)
    dV = Aᵀ dO + (K ⊙ e^{b_last − b}) dh_n                          (value_grads)

``output`` and ``value_grads`` run over ``(V/BV, N, B·H)`` and loop over key
tiles; ``d_scores`` over ``(N, B·H)``, looping over value tiles.
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
)
from .specs import chunk_state_spec, token_spec
from .tiles import causal_mask, mm


def _key_blocks(width: int, bk: int) -> list:
    return [pl.ds(c * bk, bk) for c in range(width // bk)]


def _output_kernel(q_ref, b_ref, h_ref, a_ref, v_ref, o_ref, *, scale: float, bk: int):
    dtype = v_ref.dtype
    scores = jnp.where(causal_mask(a_ref.shape[0]), a_ref[...], 0.0)
    out = mm(scores.astype(dtype), v_ref[...])
    for cols in _key_blocks(q_ref.shape[-1], bk):
        q_in = f32(q_ref[:, cols]) * (scale * jnp.exp(b_ref[:, cols]))
        out += mm(q_in.astype(dtype), h_ref[cols, :])
    o_ref[...] = out.astype(o_ref.dtype)


def output(
    q: jax.Array,
    v: jax.Array,
    b: tuple[jax.Array, jax.Array],
    h: jax.Array,
    scores: jax.Array,
    *,
    scale: float,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> jax.Array:
    """``q [B, L, H, K]``, ``v [B, L, H, V]`` (one dtype), ``b`` the float32 pair ``(hi, lo)``
    (only ``hi`` is read), ``h [B, N, H, K, V]``,
    ``scores`` (``A``) ``[B, L, H, C]`` float32 → ``o [B, L, H, V]`` in ``v.dtype``."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    chunk = tiles.chunk
    bk = block(key_width, tiles.block_k)
    bv = block(value_width, tiles.block_v)
    key_tile = token_spec(chunk, key_width, heads, lambda vb, n, bh: (bh, n, 0))
    value_tile = token_spec(chunk, bv, heads, lambda vb, n, bh: (bh, n, vb))
    return pl.pallas_call(
        lambda *refs: _output_kernel(*refs, scale=scale, bk=bk),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        grid=(value_width // bv, length // chunk, batch * heads),
        in_specs=[
            key_tile,
            key_tile,
            chunk_state_spec(None, key_width, bv, heads, lambda vb, n, bh: (bh, n, 0, vb)),
            token_spec(chunk, chunk, heads, lambda vb, n, bh: (bh, n, 0)),
            value_tile,
        ],
        out_specs=value_tile,
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name="gla_fwd_o",
    )(q, b[0], h, scores, v)  # e^{b} only: hi of the pair


def _d_scores_kernel(do_ref, v_ref, da_ref, *, scale: float, bv: int):
    chunk = do_ref.shape[0]
    d_scores = jnp.zeros((chunk, chunk), F32)
    for cols in _key_blocks(do_ref.shape[-1], bv):
        d_scores += mm(do_ref[:, cols], v_ref[:, cols], trans_b=True)
    da_ref[...] = jnp.where(causal_mask(chunk), d_scores * scale, 0.0)


def d_scores(
    d_out: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> jax.Array:
    """``d_out, v [B, L, H, V]`` (one dtype) → ``dA = scale · tril(dO Vᵀ)``
    ``[B, L, H, C]`` float32."""
    batch, length, heads, value_width = v.shape
    chunk = tiles.chunk
    bv = block(value_width, tiles.block_v)
    tile = token_spec(chunk, value_width, heads, lambda n, bh: (bh, n, 0))
    return pl.pallas_call(
        lambda *refs: _d_scores_kernel(*refs, scale=scale, bv=bv),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, chunk), F32),
        grid=(length // chunk, batch * heads),
        in_specs=[tile, tile],
        out_specs=token_spec(chunk, chunk, heads, lambda n, bh: (bh, n, 0)),
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name="gla_bwd_da",
    )(d_out, v)


def _value_grads_kernel(a_ref, do_ref, k_ref, end_ref, dh_ref, dv_ref, *, bk: int):
    dtype = do_ref.dtype
    chunk = a_ref.shape[0]
    scores = jnp.where(causal_mask(chunk), a_ref[...], 0.0)
    dv = mm(scores.astype(dtype), do_ref[...], trans_a=True)
    for cols in _key_blocks(k_ref.shape[-1], bk):
        k_in = f32(k_ref[:, cols]) * jnp.exp(end_ref[:, cols])
        dv += mm(k_in.astype(dtype), dh_ref[cols, :])
    dv_ref[...] = dv.astype(dv_ref.dtype)


def value_grads(
    scores: jax.Array,
    d_out: jax.Array,
    k: jax.Array,
    to_end: jax.Array,
    dh: jax.Array,
    *,
    tiles: GLATiles = TILES,
    interpret: bool = False,
) -> jax.Array:
    """``scores`` (``A``) ``[B, L, H, C]`` float32, ``d_out [B, L, H, V]``, ``k [B, L, H, K]``,
    ``to_end`` the float32 ``b_last − b [B, L, H, K]`` (``layout.to_chunk_end``),
    ``dh [B, N, H, K, V]`` (chunk-leaving state cotangents) → ``dv [B, L, H, V]`` in
    ``d_out.dtype``."""
    batch, length, heads, key_width = k.shape
    value_width = d_out.shape[-1]
    chunk = tiles.chunk
    bk = block(key_width, tiles.block_k)
    bv = block(value_width, tiles.block_v)
    key_tile = token_spec(chunk, key_width, heads, lambda vb, n, bh: (bh, n, 0))
    value_tile = token_spec(chunk, bv, heads, lambda vb, n, bh: (bh, n, vb))
    return pl.pallas_call(
        lambda *refs: _value_grads_kernel(*refs, bk=bk),
        out_shape=jax.ShapeDtypeStruct(d_out.shape, d_out.dtype),
        grid=(value_width // bv, length // chunk, batch * heads),
        in_specs=[
            token_spec(chunk, chunk, heads, lambda vb, n, bh: (bh, n, 0)),
            value_tile,
            key_tile,
            key_tile,
            chunk_state_spec(None, key_width, bv, heads, lambda vb, n, bh: (bh, n, 0, vb)),
        ],
        out_specs=value_tile,
        compiler_params=compiler_params(tiles),
        interpret=interpret,
        name="gla_bwd_dv",
    )(scores, d_out, k, to_end.astype(F32), dh)
