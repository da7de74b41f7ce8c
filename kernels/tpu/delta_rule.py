"""The gated delta rule by the chunk-parallel TPU kernels, forward and backward.

    S' = e^{g_t} S_{t−1},  S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ,  o_t = scale · S_tᵀ q_t

on padded head-major rows (``kernels/layout.py``): ``q, k [R, L, K]``, ``v [R, L, V]``
in one dtype, ``b, beta [R, L, 1]`` float32 (``b`` the chunk-local cumulative log
decay, zeros without a gate, as its compensated pair ``(hi, lo)``, ``kernels/gates.py``),
``h0 [R, K, V]`` float32. Per chunk (WY/UT form)::

    w, u = T diag(β)(K ⊙ e^{b}), T diag(β) V,  T = (I + A)⁻¹       chunk.wy (parallel)
    v_n = u − w h_n,  h_{n+1} = e^{b_last} h_n + (K ⊙ e^{b_last−b})ᵀ v_n
                                                          state.forward (sequential)
    o = scale [(Q ⊙ e^{b}) h_n + (Q Kᵀ ⊙ Γ) v_n]                     chunk.output (parallel)

Backward (``jax.custom_vjp``; residuals: the inputs only): ``chunk.wy`` and
``state.forward`` again (``w, u, h, v_n``), ``chunk.dv_local``, ``state.backward``
(the cotangents ``dh`` of the states leaving every chunk, through ``v_n``'s dependence
on ``h_n``), then ``chunk.backward`` with ``beta`` (``dq, dk, dv, db, dβ`` per chunk,
recomputing ``T`` in the kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..config import ScanOptions
from . import chunk, state
from .common import F32, Tiles

NAME = "delta_rule"


def _tiles(q, v, options: ScanOptions) -> Tiles:
    return Tiles(options.chunk_size, q.shape[-1], v.shape[-1])


def _states(k, v, b, beta, h0, options: ScanOptions):
    tiles = _tiles(k, v, options)
    w, u = chunk.wy(
        k, v, b, beta, tiles=tiles, inverse_block=options.inverse_block, interpret=options.interpret
    )
    h, v_new, final = state.forward(
        k, u, b, h0, w=w, tiles=tiles, interpret=options.interpret, name=NAME
    )
    assert v_new is not None  # given w
    return w, h, v_new, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def delta(q, k, v, b, beta, h0, options: ScanOptions) -> tuple[jax.Array, jax.Array]:
    """``(o [R, L, V]`` in ``v.dtype``, ``final [R, K, V]`` float32)``."""
    _, h, v_new, final = _states(k, v, b, beta, h0, options)
    out = chunk.output(
        q,
        k,
        v_new,
        h,
        b,
        scale=options.scale,
        tiles=_tiles(q, v, options),
        interpret=options.interpret,
        name=NAME,
    )
    return out, final


def _fwd(q, k, v, b, beta, h0, options: ScanOptions):
    return delta(q, k, v, b, beta, h0, options), (q, k, v, b, beta, h0)


def _bwd(options: ScanOptions, residuals, cotangents):
    q, k, v, b, beta, h0 = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(v.dtype)
    tiles, scale, interpret = _tiles(q, v, options), options.scale, options.interpret
    w, h, _, _ = _states(k, v, b, beta, h0, options)
    dv_local = chunk.dv_local(q, k, d_out, b, scale=scale, tiles=tiles, interpret=interpret)
    dh, d_h0 = state.backward(
        q,
        d_out,
        b,
        d_final.astype(F32),
        scale=scale,
        k=k,
        w=w,
        dv_local=dv_local,
        tiles=tiles,
        interpret=interpret,
        name=NAME,
    )
    dq, dk, dv, db, dbeta = chunk.backward(
        q,
        k,
        v,
        h,
        d_out,
        dh,
        b,
        beta,
        scale=scale,
        tiles=tiles,
        inverse_block=options.inverse_block,
        interpret=interpret,
        name=NAME,
    )
    # b is the compensated pair (hi, lo); lo moves with hi (kernels/gates.py)
    return dq, dk, dv, (db, jnp.zeros_like(b[1])), dbeta, d_h0


delta.defvjp(_fwd, _bwd)
