"""The recurrent form's driver: one state update per token with ``lax.scan``.

For every batch row and head, with ``a_t = exp(g_t) · exp(gk_t)`` (a K-vector)
from the log gate (:mod:`.gates`)::

    S'  = diag(a_t) · S_{t-1}                   S: [K, V]
    S_t = update(S', k_t, v_t, β_t)             (the family's rank-1 update)
    o_t = S_tᵀ q_t                               (q is pre-scaled by the op)

Linear attention adds ``k_t v_tᵀ``; the delta rule ``β_t k_t (v_t − S'ᵀ k_t)ᵀ``.
With ``T == 1`` and an initial state this is one decoding step. Packed
sequences reset the state to their own initial state at their first token.
O(T·K·V) time, O(K·V) state; the reference form for decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from xformjax.ops.common.gates import LogGate
from xformjax.ops.common.validation import Segments

#: ``(decayed S' [B, H, K, V], k_t [B, H, K], v_t [B, H, V], β_t [B, H] | None) → S_t``.
TokenUpdate = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def _log_decay_per_step(gate: LogGate) -> jax.Array | None:
    """Time-major per-step log decays, or ``None`` for the constant per-head gate."""
    if gate.kind == "head":
        return None
    return jnp.moveaxis(gate.values, 1, 0)  # [T, B, H] or [T, B, H, K]


def _decay_state(state: jax.Array, gate: LogGate, log_decay_t: jax.Array | None) -> jax.Array:
    if gate.kind == "head":
        return state * jnp.exp(gate.values)[None, :, None, None]
    assert log_decay_t is not None
    if gate.kind == "token":
        return state * jnp.exp(log_decay_t)[..., None, None]
    return state * jnp.exp(log_decay_t)[..., None]


def token_scan(
    update: TokenUpdate,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
    beta: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token recurrence with the family's ``update``.

    Args:
      update: the rank-1 update (see the module).
      q, k: ``[B, T, H, K]``; ``q`` already multiplied by the scale.
      v: ``[B, T, H, V]``.
      gate: the log decay (see :mod:`.gates`).
      initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
      segments: packing of the single batch row, or None.
      beta: ``[B, T, H]`` per-token step sizes passed to ``update``, or None.

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
            state = update(_decay_state(state, gate, g_t), k_t, v_t, b_t)
            return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

        final, o = jax.lax.scan(step, state0, (*time_major, log_decay, beta_t))
        return jnp.moveaxis(o, 0, 1), final

    num_seq = segments.num_sequences
    inits = (
        jnp.zeros((num_seq, heads, key_dim, value_dim), q.dtype)
        if initial_state is None
        else initial_state
    )

    def packed_step(carry, xs):
        state, finals = carry
        q_t, k_t, v_t, g_t, b_t, start_t, seg_t = xs
        state = jnp.where(start_t, inits[seg_t][None], state)
        state = update(_decay_state(state, gate, g_t), k_t, v_t, b_t)
        # The last write for a sequence happens at its last token: its final state.
        finals = finals.at[seg_t].set(state[0])
        return (state, finals), jnp.einsum("bhk,bhkv->bhv", q_t, state)

    (_, finals), o = jax.lax.scan(
        packed_step,
        (zeros, inits),
        (*time_major, log_decay, beta_t, segments.is_start, segments.ids),
    )
    return jnp.moveaxis(o, 0, 1), finals
