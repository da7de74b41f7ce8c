"""Recurrent form of linear attention: one state update per token with ``lax.scan``.

For every batch row and head, with ``a_t = exp(g_t) · exp(gk_t)`` (a K-vector)::

    S_t = diag(a_t) · S_{t-1} + k_t v_tᵀ        S: [K, V]
    o_t = S_tᵀ q_t                               (q is pre-scaled by the op)

With ``beta`` (``[B, T, H]``) the rank-1 update is the delta rule instead::

    S'  = diag(a_t) · S_{t-1};   S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ

With ``T == 1`` and an initial state this is one decoding step. Packed
sequences reset the state to their own initial state at their first token.
O(T·K·V) time, O(K·V) state; the reference form for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common import Segments
from xformjax.ops.common.gates import LogGate


def _log_decay_per_step(gate: LogGate) -> jax.Array | None:
    """Time-major per-step log decays, or ``None`` for the constant per-head gate."""
    if gate.kind == "head":
        return None
    return jnp.moveaxis(gate.values, 1, 0)  # [T, B, H] or [T, B, H, K]


def _decay_state(state: jax.Array, gate: LogGate, log_decay_t: jax.Array | None) -> jax.Array:
    if gate.kind == "head":
        return state * jnp.exp(gate.values)[None, :, None, None]
    if gate.kind == "token":
        return state * jnp.exp(log_decay_t)[..., None, None]
    return state * jnp.exp(log_decay_t)[..., None]


def _update(decayed: jax.Array, k_t: jax.Array, v_t: jax.Array,
            beta_t: jax.Array | None) -> jax.Array:
    """Add ``k vᵀ`` (linear attention) or ``β k (v − S'ᵀk)ᵀ`` (delta rule)."""
    if beta_t is not None:
        v_t = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", decayed, k_t))
    return decayed + k_t[..., :, None] * v_t[..., None, :]


def linear_attention_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, gate: LogGate,
                               initial_state: jax.Array | None,
                               segments: Segments | None,
                               beta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Token-by-token linear attention.

    Args:
      q, k: ``[B, T, H, K]``; ``q`` already multiplied by the scale.
      v: ``[B, T, H, V]``.
      gate: the log decay (see :mod:`gates`).
      initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
      segments: packing of the single batch row, or None.
      beta: ``[B, T, H]`` delta-rule step sizes, or None for linear attention.

    Returns:
      ``o`` ``[B, T, H, V]`` and the final states ``[N, H, K, V]``.
    """
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    zeros = jnp.zeros((batch, heads, key_dim, value_dim), q.dtype)
    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v)]
    log_decay = _log_decay_per_step(gate)
    beta_t = None if beta is None else jnp.moveaxis(beta, 1, 0)

    if segments is None:
        state0 = zeros if initial_state is None else initial_state

        def step(state, xs):
            q_t, k_t, v_t, g_t, b_t = xs
            state = _update(_decay_state(state, gate, g_t), k_t, v_t, b_t)
            return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

        final, o = jax.lax.scan(step, state0, (*time_major, log_decay, beta_t))
        return jnp.moveaxis(o, 0, 1), final

    num_seq = segments.num_sequences
    inits = (jnp.zeros((num_seq, heads, key_dim, value_dim), q.dtype)
             if initial_state is None else initial_state)

    def packed_step(carry, xs):
        state, finals = carry
        q_t, k_t, v_t, g_t, b_t, start_t, seg_t = xs
        state = jnp.where(start_t, inits[seg_t][None], state)
        state = _update(_decay_state(state, gate, g_t), k_t, v_t, b_t)
        # The last write for a sequence happens at its last token: its final state.
        finals = finals.at[seg_t].set(state[0])
        return (state, finals), jnp.einsum("bhk,bhkv->bhv", q_t, state)

    (_, finals), o = jax.lax.scan(
        packed_step, (zeros, inits),
        (*time_major, log_decay, beta_t, segments.is_start, segments.ids))
    return jnp.moveaxis(o, 0, 1), finals
