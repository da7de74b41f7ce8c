"""The three forms of Aaren over per-token scores: one prefix scan, chunked prefix
scans with a carry, and a token-by-token recurrence.

Every form takes the scores ``s`` ``[B, T, H]`` (already ``scale · q · k``), the
values ``v`` ``[B, T, H, V]`` and the initial summary (:class:`AarenState` with
``[B, H]`` leaves), all in the computation dtype, and returns
``(o [B, T, H, V], final AarenState)`` with ``o_t = u_t / w_t`` of the summary
``initial ⊕ token_1 ⊕ … ⊕ token_t``. With ``starts`` (bool ``[B, T, H]``: the token
begins a packed document) the summary restarts there: it is that of the tokens
since the last beginning (``initial`` is dropped), via the segmented combine
:func:`~xformjax.ops.aaren.state.combine_segmented`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.aaren.state import (
    AarenState,
    combine,
    combine_segmented,
    read_out,
    select,
    token_summaries,
)


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
    scores: jax.Array, v: jax.Array, initial: AarenState, starts: jax.Array | None = None
) -> tuple[jax.Array, AarenState]:
    """One ``associative_scan`` over all T tokens: O(T) work in O(log T) parallel steps."""
    tokens = token_summaries(scores, v)
    if starts is None:
        prefixes = jax.lax.associative_scan(combine, tokens, axis=1)
        summaries = _with_initial(initial, prefixes, time_axis=1)
    else:
        prefixes, begun = jax.lax.associative_scan(combine_segmented, (tokens, starts), axis=1)
        summaries = select(begun, prefixes, _with_initial(initial, prefixes, time_axis=1))
    return read_out(summaries), _last(summaries, time_axis=1)


def aaren_chunk(
    scores: jax.Array,
    v: jax.Array,
    initial: AarenState,
    chunk_size: int,
    starts: jax.Array | None = None,
) -> tuple[jax.Array, AarenState]:
    """Prefix scans inside chunks of ``chunk_size`` tokens (all chunks at once), then
    the carries — the summary of everything before each chunk — threaded across
    chunks with ``lax.scan`` over the chunk totals, and folded into each chunk's
    prefixes: linear in T, the work inside a chunk in parallel.

    The last chunk is padded with empty summaries ``(−inf, 0, 0)`` — the identity
    of ``⊕`` — so padding changes neither the outputs nor the final state. With
    ``starts``, the prefixes, the carries and the fold use the segmented combine: a
    chunk prefix that holds a beginning ignores the carry.
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
        if starts is not None:  # [B, T, H]
            starts = jnp.pad(starts, ((0, 0), (0, pad), (0, 0)))

    def chunked(x):  # [B, num_chunks, C, H(, V)]
        return x.reshape(batch, num_chunks, size, *x.shape[2:])

    chunks = AarenState(*(chunked(x) for x in tokens))
    if starts is None:
        prefixes = jax.lax.associative_scan(combine, chunks, axis=2)
        begun = None
    else:
        prefixes, begun = jax.lax.associative_scan(
            combine_segmented, (chunks, chunked(starts)), axis=2
        )
    totals = AarenState(*(jnp.moveaxis(x[:, :, -1], 1, 0) for x in prefixes))
    totals_begun = (
        jnp.zeros((num_chunks,), bool) if begun is None else jnp.moveaxis(begun[:, :, -1], 1, 0)
    )

    def carry_over(carry: AarenState, xs):
        total, total_begun = xs
        merged = combine(carry, total)
        return (merged if begun is None else select(total_begun, total, merged)), carry

    # carries: the exclusive prefix (the summary before each chunk)
    final, carries = jax.lax.scan(carry_over, initial, (totals, totals_begun))
    carries = AarenState(*(jnp.moveaxis(x, 0, 1)[:, :, None] for x in carries))
    summaries = combine(carries, prefixes)
    if begun is not None:
        summaries = select(begun, prefixes, summaries)
    o = read_out(summaries)
    return o.reshape(batch, num_chunks * size, heads, value_dim)[:, :length], final


def aaren_recurrent(
    scores: jax.Array, v: jax.Array, initial: AarenState, starts: jax.Array | None = None
) -> tuple[jax.Array, AarenState]:
    """Token by token with ``lax.scan``: ``state ← state ⊕ (s_t, v_t, 1)`` (or just
    ``(s_t, v_t, 1)`` where a document begins), ``o_t = u/w`` (a decoding step when
    ``T == 1``)."""
    time_major = token_summaries(jnp.moveaxis(scores, 1, 0), jnp.moveaxis(v, 1, 0))
    begins = jnp.zeros(scores.shape, bool) if starts is None else starts

    def step(state: AarenState, xs):
        token, begin = xs
        merged = combine(state, token)
        state = merged if starts is None else select(begin, token, merged)
        return state, read_out(state)

    final, o = jax.lax.scan(step, initial, (time_major, jnp.moveaxis(begins, 1, 0)))
    return jnp.moveaxis(o, 0, 1), final
