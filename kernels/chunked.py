"""The fused chunked scans with their backward kernels, wired by ``jax.custom_vjp``.

Inputs are head-major and padded (see ``layout.py``): ``q, k [R, L, K]``,
``v [R, L, V]``, the chunk-local cumulative log decay ``b [R, L, 1]`` (scalar)
or ``[R, L, K]`` (per channel), ``beta [R, L, 1]`` (delta rule) and the initial
state ``h0 [R, K, V]`` (float32), with ``R = B·H`` and ``L`` a multiple of the
chunk. They return ``(o [R, L, V], final_state [R, K, V])``.

Forward: one pass over the chunks, writing the outputs, the final state and,
when differentiated, the state entering every chunk ``[R, L/C, K, V]`` — the
only residual besides the inputs, so memory is O(L·D + (L/C)·K·V).

Backward: one reverse pass carrying the state cotangent; each chunk
recomputes its scores (and for the delta rule its WY/UT transform and
pseudo-values) from the saved entering state, then emits ``dq, dk, dv, db``
(``dbeta``) and passes the state cotangent on. What reaches the first chunk is
the initial state's cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import chunk_math
from .config import ScanOptions
from .driver import chunk_scan

F32 = jnp.float32


def _as_f32(arrays):
    return [x.astype(F32) for x in arrays]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def scalar_scan(q, k, v, b, beta, h0, options: ScanOptions) -> tuple[jax.Array, jax.Array]:
    """Linear attention (``beta is None``) or the delta rule, scalar gate.

    ``options``: the call's static :class:`~xformjax.kernels.config.ScanOptions`.
    """
    return _scalar_forward(q, k, v, b, beta, h0, options, save_entering=False)[:2]


def _scalar_forward(q, k, v, b, beta, h0, options: ScanOptions, save_entering: bool):
    scale, chunk_size, inverse_block = options.scale, options.chunk_size, options.inverse_block
    target, interpret = options.target, options.interpret
    delta = beta is not None

    def step(tokens, _, state):
        q_c, k_c, v_c, b_c, *rest = _as_f32(tokens)
        beta_c = rest[0] if delta else None
        out, new_state = chunk_math.scalar_forward(
            q_c * scale, k_c, v_c, b_c, beta_c, state, delta=delta, inverse_block=inverse_block
        )
        return [out], new_state

    tokens = [q, k, v, b] + ([beta] if delta else [])
    (out,), entering, final = chunk_scan(
        step,
        tokens,
        [],
        h0,
        chunk_size=chunk_size,
        out_dims=[v.shape[2]],
        out_dtypes=[jnp.result_type(q, k, v)],
        save_entering=save_entering,
        reverse=False,
        target=target,
        interpret=interpret,
        name="delta_rule_fwd" if delta else "linear_attention_fwd",
    )
    return out, final, entering


def _scalar_fwd_rule(q, k, v, b, beta, h0, options):
    out, final, entering = _scalar_forward(q, k, v, b, beta, h0, options, save_entering=True)
    return (out, final), (q, k, v, b, beta, entering)


def _scalar_bwd_rule(options, residuals, cotangents):
    scale, chunk_size, inverse_block = options.scale, options.chunk_size, options.inverse_block
    target, interpret = options.target, options.interpret
    q, k, v, b, beta, entering = residuals
    d_out, d_final = cotangents
    delta = beta is not None

    def step(tokens, per_chunk, d_state):
        q_c, k_c, v_c, b_c, *rest = _as_f32(tokens)
        beta_c, d_out_c = (rest[0], rest[1]) if delta else (None, rest[0])
        (state,) = per_chunk
        dq, dk, dv, db, dbeta, d_state = chunk_math.scalar_backward(
            q_c * scale,
            k_c,
            v_c,
            b_c,
            beta_c,
            d_out_c,
            state,
            d_state,
            delta=delta,
            inverse_block=inverse_block,
        )
        outs = [dq * scale, dk, dv, db] + ([dbeta] if delta else [])
        return outs, d_state

    tokens = [q, k, v, b] + ([beta] if delta else []) + [d_out]
    dims = [q.shape[2], k.shape[2], v.shape[2], 1] + ([1] if delta else [])
    dtypes = [q.dtype, k.dtype, v.dtype, F32] + ([F32] if delta else [])
    grads, _, d_h0 = chunk_scan(
        step,
        tokens,
        [entering],
        d_final.astype(F32),
        chunk_size=chunk_size,
        out_dims=dims,
        out_dtypes=dtypes,
        save_entering=False,
        reverse=True,
        target=target,
        interpret=interpret,
        name="delta_rule_bwd" if delta else "linear_attention_bwd",
    )
    dq, dk, dv, db = grads[:4]
    dbeta = grads[4] if delta else None
    return dq, dk, dv, db, dbeta, d_h0


scalar_scan.defvjp(_scalar_fwd_rule, _scalar_bwd_rule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def channel_scan(q, k, v, b, h0, options: ScanOptions) -> tuple[jax.Array, jax.Array]:
    """Linear attention with a per-key-channel gate (GLA); ``options`` as ``scalar_scan``."""
    return _channel_forward(q, k, v, b, h0, options, save_entering=False)[:2]


def _channel_forward(q, k, v, b, h0, options: ScanOptions, save_entering: bool):
    scale, chunk_size = options.scale, options.chunk_size
    target, interpret = options.target, options.interpret

    def step(tokens, _, state):
        q_c, k_c, v_c, b_c = _as_f32(tokens)
        out, new_state = chunk_math.channel_forward(q_c * scale, k_c, v_c, b_c, state)
        return [out], new_state

    (out,), entering, final = chunk_scan(
        step,
        [q, k, v, b],
        [],
        h0,
        chunk_size=chunk_size,
        out_dims=[v.shape[2]],
        out_dtypes=[jnp.result_type(q, k, v)],
        save_entering=save_entering,
        reverse=False,
        target=target,
        interpret=interpret,
        name="gated_linear_attention_fwd",
    )
    return out, final, entering


def _channel_fwd_rule(q, k, v, b, h0, options):
    out, final, entering = _channel_forward(q, k, v, b, h0, options, save_entering=True)
    return (out, final), (q, k, v, b, entering)


def _channel_bwd_rule(options, residuals, cotangents):
    scale, chunk_size = options.scale, options.chunk_size
    target, interpret = options.target, options.interpret
    q, k, v, b, entering = residuals
    d_out, d_final = cotangents

    def step(tokens, per_chunk, d_state):
        q_c, k_c, v_c, b_c, d_out_c = _as_f32(tokens)
        dq, dk, dv, db, d_state = chunk_math.channel_backward(
            q_c * scale, k_c, v_c, b_c, d_out_c, per_chunk[0], d_state
        )
        return [dq * scale, dk, dv, db], d_state

    (dq, dk, dv, db), _, d_h0 = chunk_scan(
        step,
        [q, k, v, b, d_out],
        [entering],
        d_final.astype(F32),
        chunk_size=chunk_size,
        out_dims=[q.shape[2], k.shape[2], v.shape[2], b.shape[2]],
        out_dtypes=[q.dtype, k.dtype, v.dtype, F32],
        save_entering=False,
        reverse=True,
        target=target,
        interpret=interpret,
        name="gated_linear_attention_bwd",
    )
    return dq, dk, dv, db, d_h0


channel_scan.defvjp(_channel_fwd_rule, _channel_bwd_rule)
