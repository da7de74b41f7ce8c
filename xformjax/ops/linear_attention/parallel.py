"""Parallel (quadratic) form of linear attention: the masked T×T decay matrix.

With ``Λ_ij = Σ_{s=j+1}^{i} log a_s`` (the log decay from step j to step i)::

    o_i = Σ_{j ≤ i, same sequence} (q_i ⊙ exp(Λ_ij))·k_j  v_j
        + (q_i ⊙ exp(Σ_{s=start..i} log a_s))ᵀ S_0

Each ``Λ_ij`` is summed directly over its own steps (a masked reverse
cumulative sum), never as a difference of two long prefix sums, so strong
gates lose no precision; the exponent is masked before ``exp``. Time O(T²·K)
(``O(T²·K)`` memory for the per-channel gate, ``O(T²)`` otherwise): for short
sequences and as a check on the other forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common import Segments
from xformjax.ops.common.gates import LogGate


def _inclusive_range_sums(log_a: jax.Array) -> jax.Array:
    """``R[..., i, j] = Σ_{s=j}^{i} log_a[..., s]`` for ``j ≤ i`` (0 above the diagonal).

    ``log_a`` has time last, ``[..., T]``; the result is ``[..., T, T]``.
    """
    num_tokens = log_a.shape[-1]
    causal = jnp.tril(jnp.ones((num_tokens, num_tokens), bool))
    terms = jnp.where(causal, log_a[..., None, :], 0.0)
    return jnp.flip(jnp.cumsum(jnp.flip(terms, -1), axis=-1), -1)


def _log_decays(gate: LogGate, num_tokens: int, starts: jax.Array):
    """Return ``(Λ, E)``: pairwise log decays ``Λ[.., i, j]`` and ``E[.., i]``, the log
    decay from the token's sequence start through ``i`` (applied to the initial state).

    Layouts: head ``[H, T, T]`` / ``[H, T]``; token ``[B, H, T, T]`` / ``[B, H, T]``;
    channel ``[B, H, K, T, T]`` / ``[B, H, K, T]``. ``starts[i]`` is the first
    token of token i's sequence.
    """
    positions = jnp.arange(num_tokens)
    if gate.kind == "head":
        g = gate.values[:, None]
        pairwise = g[..., None] * (positions[:, None] - positions[None, :])
        return pairwise, g * (positions - starts + 1)
    time_last = (
        jnp.moveaxis(gate.values, 1, -1)
        if gate.kind == "token"
        else jnp.transpose(gate.values, (0, 2, 3, 1))
    )
    sums = _inclusive_range_sums(time_last)
    pairwise = jnp.concatenate([sums[..., 1:], jnp.zeros_like(sums[..., :1])], axis=-1)
    from_start = sums[..., positions, starts]
    return pairwise, from_start


def _decay_factor(log_decay: jax.Array, gate: LogGate) -> jax.Array:
    """Broadcast a head/token log decay ``[.., T]`` against ``[B, H, T, K]``."""
    if gate.kind == "channel":
        return jnp.exp(jnp.swapaxes(log_decay, -1, -2))
    return jnp.exp(log_decay)[..., None]


def linear_attention_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
) -> tuple[jax.Array, jax.Array]:
    """Quadratic-form linear attention; arguments and results as the recurrent form."""
    batch, num_tokens = q.shape[:2]
    qh, kh, vh = (jnp.moveaxis(x, 1, 2) for x in (q, k, v))  # [B, H, T, D]
    positions = jnp.arange(num_tokens)
    if segments is None:
        seg_ids = jnp.zeros((num_tokens,), jnp.int32)
        starts = jnp.zeros((num_tokens,), jnp.int32)
    else:
        seg_ids, starts = segments.ids, segments.starts[segments.ids]
    allowed = (positions[None, :] <= positions[:, None]) & (seg_ids[:, None] == seg_ids[None, :])

    pairwise, from_start = _log_decays(gate, num_tokens, starts)
    decay = jnp.exp(jnp.where(allowed, pairwise, -jnp.inf))
    if gate.kind == "channel":
        scores = jnp.einsum("bhik,bhjk,bhkij->bhij", qh, kh, decay)
    else:
        scores = jnp.einsum("bhik,bhjk->bhij", qh, kh) * decay
    out = jnp.einsum("bhij,bhjv->bhiv", scores, vh)

    if initial_state is not None:
        q_decayed = qh * _decay_factor(from_start, gate)
        if segments is None:
            out = out + jnp.einsum("bhik,bhkv->bhiv", q_decayed, initial_state)
        else:
            token_init = initial_state[seg_ids]  # [T, H, K, V]
            out = out + jnp.einsum("bhik,ihkv->bhiv", q_decayed, token_init)

    # Final states: row `e` of the decay matrix is the decay to each sequence's end.
    if segments is None:
        rows, ends, seq_of_final = jnp.arange(batch), jnp.full((batch,), num_tokens - 1), None
    else:
        num_seq = segments.num_sequences
        rows, ends = jnp.zeros((num_seq,), jnp.int32), segments.ends - 1
        seq_of_final = jnp.arange(num_seq)
    safe_ends = jnp.maximum(ends, 0)
    end_allowed = allowed[safe_ends]  # [N, T]
    if seq_of_final is not None:
        end_allowed &= seg_ids[None, :] == seq_of_final[:, None]
    if gate.kind == "head":
        end_log = pairwise[:, safe_ends].swapaxes(0, 1)  # [N, H, T]
        end_log = jnp.where(end_allowed[:, None], end_log, -jnp.inf)
        k_end = kh[rows] * jnp.exp(end_log)[..., None]
    elif gate.kind == "token":
        end_log = pairwise[rows, :, safe_ends]  # [N, H, T]
        end_log = jnp.where(end_allowed[:, None], end_log, -jnp.inf)
        k_end = kh[rows] * jnp.exp(end_log)[..., None]
    else:
        end_log = pairwise[rows, :, :, safe_ends]  # [N, H, K, T]
        end_log = jnp.where(end_allowed[:, None, None], end_log, -jnp.inf)
        k_end = kh[rows] * jnp.exp(jnp.swapaxes(end_log, -1, -2))
    finals = jnp.einsum("nhjk,nhjv->nhkv", k_end, vh[rows])
    if initial_state is not None:
        if gate.kind == "head":
            init_log = from_start[:, safe_ends].T[..., None]  # [N, H, 1]
        elif gate.kind == "token":
            init_log = from_start[rows, :, safe_ends][..., None]
        else:
            init_log = from_start[rows, :, :, safe_ends]  # [N, H, K]
        finals = finals + jnp.exp(init_log)[..., None] * initial_state
        if segments is not None:
            empty = (segments.lengths == 0)[:, None, None, None]
            finals = jnp.where(empty, initial_state, finals)
    return jnp.moveaxis(out, 1, 2), finals
