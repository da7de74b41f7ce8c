"""Scalar-gated linear attention by the chunk-parallel TPU kernels, forward and backward.

    h_{n+1} = e^{b_last} h_n + (k ⊙ e^{b_last − b})ᵀ v
    o = scale [(q ⊙ e^{b}) h_n + (q kᵀ ⊙ Γ) v]

on padded head-major rows (``kernels/layout.py``): ``q, k [R, L, K]``, ``v [R, L, V]``
in one dtype, ``b [R, L, 1]`` the chunk-local cumulative log decay (float32, zeros
without a gate), ``h0 [R, K, V]`` float32. Kernels:

* forward: ``state.forward`` (the states entering every chunk, sequential over chunks,
  parallel over rows and value tiles) then ``chunk.output`` (parallel over chunks);
* backward (``jax.custom_vjp``; residuals: the inputs and the entering states ``h``
  in the inputs' dtype): ``state.backward`` (the cotangents of the states leaving
  every chunk, and ``d_h0``) then ``chunk.backward`` (``dq, dk, dv, db``, parallel over
  chunks). XLA's autodiff of the padding and the chunk cumsum turns ``db`` into ``dg``.
"""

from __future__ import annotations

import functools

import jax

from ..config import ScanOptions
from . import chunk, state
from .common import F32, Tiles

NAME = "linear_attention"


def tiles_of(q: jax.Array, v: jax.Array, options: ScanOptions) -> Tiles:
    return Tiles(options.chunk_size, q.shape[-1], v.shape[-1])


def _forward(q, k, v, b, h0, options: ScanOptions):
    tiles = tiles_of(q, v, options)
    h, _, final = state.forward(k, v, b, h0, tiles=tiles, interpret=options.interpret, name=NAME)
    out = chunk.output(
        q, k, v, h, b, scale=options.scale, tiles=tiles, interpret=options.interpret, name=NAME
    )
    return out, final, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def scalar_attention(q, k, v, b, h0, options: ScanOptions) -> tuple[jax.Array, jax.Array]:
    """``(o [R, L, V]`` in ``v.dtype``, ``final [R, K, V]`` float32)``."""
    out, final, _ = _forward(q, k, v, b, h0, options)
    return out, final


def _fwd(q, k, v, b, h0, options: ScanOptions):
    out, final, h = _forward(q, k, v, b, h0, options)
    return (out, final), (q, k, v, b, h)


def _bwd(options: ScanOptions, residuals, cotangents):
    q, k, v, b, h = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(v.dtype)
    tiles = tiles_of(q, v, options)
    dh, d_h0 = state.backward(
        q,
        d_out,
        b,
        d_final.astype(F32),
        scale=options.scale,
        tiles=tiles,
        interpret=options.interpret,
        name=NAME,
    )
    dq, dk, dv, db, _ = chunk.backward(
        q,
        k,
        v,
        h,
        d_out,
        dh,
        b,
        scale=options.scale,
        tiles=tiles,
        inverse_block=options.inverse_block,
        interpret=options.interpret,
        name=NAME,
    )
    return dq, dk, dv, db, d_h0


scalar_attention.defvjp(_fwd, _bwd)
