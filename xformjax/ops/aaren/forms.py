"""The three forms of Aaren over per-token scores: one prefix scan, chunked prefix
scans with a carry, and a token-by-token recurrence.

Every form takes the scores ``s`` ``[B, T, H]`` (already ``scale · q · k``), the
values ``v`` ``[B, T, H, V]`` and the initial summary (:class:`AarenState` with
``[B, H]`` leaves), all in the computation dtype, and returns
``(o [B, T, H, V], final AarenState)`` with ``o_t = u_t / w_t`` of the summary
``initial ⊕ token_1 ⊕ … ⊕ token_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.aaren.state import AarenState, combine, read_out, token_summaries


def _with_initial(initial: AarenState, prefixes: AarenState, time_axis: int) -> AarenState:
    """``initial ⊕ prefix_t`` for every t (``initial`` broadcast along ``time_axis``)."""
    expand = AarenState(
        jnp.expand_dims(initial.max, time_axis),
        jnp.expand_dims(initial.numerator, time_axis),
        jnp.expand_dims(initial.denominator, time_axis),
    )
    return combine(expand, prefixes)


def _last(summary: AarenState, time_axis: int) -> AarenState:
    return AarenState(*(jnp.take(x, -1, axis=time_axis) for x in summary))


def aaren_parallel(
    scores: jax.Array, v: jax.Array, initial: AarenState
) -> tuple[jax.Array, AarenState]:
    """One ``associative_scan`` over all T tokens: O(T) work in O(log T) parallel steps."""
    prefixes = jax.lax.associative_scan(combine, token_summaries(scores, v), axis=1)
    summaries = _with_initial(initial, prefixes, time_axis=1)
    return read_out(summaries), _last(summaries, time_axis=1)


def aaren_chunk(
    scores: jax.Array, v: jax.Array, initial: AarenState, chunk_size: int
) -> tuple[jax.Array, AarenState]:
    """Prefix scans inside chunks of ``chunk_size`` tokens (all chunks at once), then
    the carries — the summary of everything before each chunk — threaded across
    chunks with ``lax.scan`` over the chunk totals, and folded into each chunk's
    prefixes: linear in T, the work inside a chunk in parallel.

    The last chunk is padded with empty summaries ``(−inf, 0, 0)`` — the identity
    of ``⊕`` — so padding changes neither the outputs nor the final state.
    """
    batch, length, heads, value_dim = v.shape
    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    pad = num_chunks * size - length
    tokens = token_summaries(scores, v)
    if pad:
        tokens = AarenState(
            jnp.pad(tokens.max, ((0, 0), (0, pad), (0, 0)), constant_values=-jnp.inf),
            jnp.pad(tokens.numerator, ((0, 0), (0, pad), (0, 0), (0, 0))),
            jnp.pad(tokens.denominator, ((0, 0), (0, pad), (0, 0))),
        )
    # [B, num_chunks, C, H(, V)]
    chunks = AarenState(*(x.reshape(batch, num_chunks, size, *x.shape[2:]) for x in tokens))
    prefixes = jax.lax.associative_scan(combine, chunks, axis=2)
    totals = AarenState(*(jnp.moveaxis(x[:, :, -1], 1, 0) for x in prefixes))

    def carry_over(carry: AarenState, total: AarenState):
        return combine(carry, total), carry

    final, carries = jax.lax.scan(carry_over, initial, totals)  # carries: exclusive prefix
    carries = AarenState(*(jnp.moveaxis(x, 0, 1)[:, :, None] for x in carries))
    o = read_out(combine(carries, prefixes))
    return o.reshape(batch, num_chunks * size, heads, value_dim)[:, :length], final


def aaren_recurrent(
    scores: jax.Array, v: jax.Array, initial: AarenState
) -> tuple[jax.Array, AarenState]:
    """Token by token with ``lax.scan``: ``state ← state ⊕ (s_t, v_t, 1)``,
    ``o_t = u/w`` (a decoding step when ``T == 1``)."""
    time_major = token_summaries(jnp.moveaxis(scores, 1, 0), jnp.moveaxis(v, 1, 0))

    def step(state: AarenState, token: AarenState):
        state = combine(state, token)
        return state, read_out(state)

    final, o = jax.lax.scan(step, initial, time_major)
    return jnp.moveaxis(o, 0, 1), final
