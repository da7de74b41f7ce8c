"""Scalar-gated linear attention by the chunk-parallel TPU kernels, forward and backward.

    h_{n+1} = e^{b_last} h_n + (k ⊙ e^{b_last − b})ᵀ v
    o = scale [(q ⊙ e^{b}) h_n + (q kᵀ ⊙ Γ) v]

on padded head-major rows (``kernels/layout.py``): ``q, k [R, L, K]``, ``v [R, L, V]``
in one dtype, ``b [R, L, 1]`` the chunk-local cumulative log decay (float32, zeros
without a gate; the compensated pair ``(hi, lo)`` of ``kernels/gates.py``),
``h0 [R, K, V]`` float32. Kernels:

* forward: ``state.forward`` (the states entering every chunk, sequential over chunks,
  parallel over rows and value tiles) then ``chunk.output`` (parallel over chunks);
* backward (``jax.custom_vjp``; residuals: the inputs and the entering states ``h``
  in the inputs' dtype): ``state.backward`` (the cotangents of the states leaving
  every chunk, and ``d_h0``) then ``chunk.backward`` (``dq, dk, dv, db``, parallel over
  chunks). XLA's autodiff of the padding and the chunk cumsum turns ``db`` into ``dg``.
"""

from __future__ import annotations

from ..config import ScanOptions
from . import chunk
from .attention import state_attention, tiles_of

NAME = "linear_attention"


def _output(q, k, v, h, b, options: ScanOptions):
    tiles = tiles_of(q, v, options)
    return chunk.output(
        q, k, v, h, b, scale=options.scale, tiles=tiles, interpret=options.interpret, name=NAME
    )


def _gradients(q, k, v, h, d_out, dh, b, options: ScanOptions):
    dq, dk, dv, db, _ = chunk.backward(
        q,
        k,
        v,
        h,
        d_out,
        dh,
        b,
        scale=options.scale,
        tiles=tiles_of(q, v, options),
        inverse_block=options.inverse_block,
        interpret=options.interpret,
        name=NAME,
    )
    return dq, dk, dv, db


#: ``(q, k, v, b, h0, options) -> (o [R, L, V]`` in ``v.dtype``, ``final [R, K, V]`` float32)``
scalar_attention = state_attention(NAME, _output, _gradients)
