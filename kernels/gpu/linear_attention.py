"""Scalar-gated linear attention by the chunk-parallel GPU kernels, forward and backward.

    S_t = exp(g_t) S_{t−1} + k_t v_tᵀ        o_t = scale · S_tᵀ q_t        (S: [K, V])

with no gate, ``g [H]`` or ``g [B, T, H]`` (natural-log decays ≤ 0). Inputs are
padded (``layout.py``: ``L`` a multiple of the chunk, features powers of two ≥ 16)
and the gate becomes the chunk-local cumulative log decay ``b`` in XLA. Then:

* forward: ``chunk_h.state_forward`` (the states entering every chunk, the only
  sequential kernel) and ``chunk_o.output``;
* backward (``jax.custom_vjp``; the residuals are the inputs and the entering
  states ``h [B, N, H, K, V]`` in the input dtype): ``chunk_h.state_backward``
  (the cotangents of the states leaving every chunk, and the initial state's),
  ``chunk_o.value_backward`` (``dv``) and ``chunk_o.query_key_backward``
  (``dq, dk, db``). XLA's autodiff of the
  padding, the broadcast of ``g [H]`` and the chunk cumsum turns ``db`` into
  ``dg`` (a reverse cumulative sum inside each chunk, summed over ``B, T`` for
  ``g [H]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import chunk_h, chunk_o, layout
from .layout import F32, Options


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    initial_state: jax.Array | None,
    *,
    scale: float,
    interpret: bool,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunked linear attention with a scalar gate.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16).
      g: log decay ``[H]`` or ``[B, T, H]``, or ``None`` (no gate).
      initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
      scale: the query scale.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      chunk_size: tokens per chunk (a power of two ≥ 16).

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]``
      float32). Differentiable in ``q, k, v, g`` and ``initial_state``.
    """
    batch, num_tokens, heads, key_dim = q.shape
    q_p, k_p, v_p, h0 = layout.pad_inputs(q, k, v, initial_state, chunk_size)
    b = layout.chunk_gate(g, (batch, num_tokens, heads), q_p.shape[1], chunk_size)
    options = Options(float(scale), chunk_size, bool(interpret))
    # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
    out, final = _attend(q_p, k_p, v_p, b, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    return layout.unpad_outputs(out, final, num_tokens, key_dim, v.shape[-1])


def _forward(q, k, v, b, h0, options: Options):
    size, interpret = options.chunk_size, options.interpret
    h, final = chunk_h.state_forward(k, v, b, h0, chunk_size=size, interpret=interpret)
    out = chunk_o.output(q, k, v, h, b, scale=options.scale, chunk_size=size, interpret=interpret)
    return out, final, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, b, h0, options: Options):
    """Padded ``(o, final)``: ``q, k [B, L, H, K]``, ``v [B, L, H, V]`` (one dtype),
    ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H]`` (``layout.chunk_gate``) or ``None``,
    ``h0 [B, H, K, V]`` float32."""
    out, final, _ = _forward(q, k, v, b, h0, options)
    return out, final


def _attend_fwd(q, k, v, b, h0, options: Options):
    out, final, h = _forward(q, k, v, b, h0, options)
    return (out, final), (q, k, v, b, h)


def _attend_bwd(options: Options, residuals, cotangents):
    q, k, v, b, h = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(q.dtype)
    size, interpret, scale = options.chunk_size, options.interpret, options.scale
    dh, d_h0 = chunk_h.state_backward(
        q, d_out, b, d_final.astype(F32), scale=scale, chunk_size=size, interpret=interpret
    )
    dv = chunk_o.value_backward(
        q, k, d_out, dh, b, scale=scale, chunk_size=size, dtype=v.dtype, interpret=interpret
    )
    dq, dk, _, db = chunk_o.query_key_backward(
        q, k, v, h, d_out, dh, b, scale=scale, chunk_size=size, interpret=interpret
    )
    if b is not None:
        db = (db, jnp.zeros_like(b[1]))  # the pair's lo moves with hi (gates.py)
    return dq, dk, dv, db, d_h0


_attend.defvjp(_attend_fwd, _attend_bwd)
