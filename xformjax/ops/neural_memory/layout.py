"""Packed documents laid out for the neural memory's chunk form.

The chunk form takes every gradient of a chunk at the chunk-start weights, so its
result depends on where chunks begin: alone, a document's chunks begin at its first
token. In a packed row a document may begin mid-chunk, so the row is re-laid out into
a buffer of ``S`` slots of ``C`` tokens where every document gets its own chunk grid
(and gathered back afterwards); the op's ``resets`` restart the memory at each
document (:func:`xformjax.ops.neural_memory.neural_memory`). Per row:

- a *long* document (more than ``C`` tokens, or the one that continues the state the
  call is given) takes ``⌈L/C⌉`` whole slots of its own, its first token first;
- a *short* document (``≤ C`` tokens) fits in one chunk, whose gradients are all at the
  initial weights wherever it starts: short documents are put back to back (their
  lengths' running sum ``P``) and share slots; one that would straddle a slot boundary
  gets a slot of its own instead. Every slot of short documents begins with a reset,
  so a reset inside it is a fresh start too (the op's rule for resets inside a chunk).

Long documents use ``⌈L/C⌉ < 2L/C`` slots, the shared slots ``⌈T_s/C⌉`` and the
straddling ones at most ``T_s/C``, the continued document at most one slot more than
its share: ``S = 2⌈N/C⌉ + 2`` slots always suffice for ``N`` tokens, whatever the
documents — the buffer is about twice the row, so the chunk form costs about twice
the unpacked one. Rows of a few documents waste less: a long document leaves less
than one slot unfilled (its last chunk), and any row of up to three documents fits in
its first :func:`compact_slots` ``= ⌈N/C⌉ + 2`` slots (checked over random rows in the
tests); :func:`used_rows` says whether a batch does (the layer then runs the op over
those rows only). Unused rows of the buffer are zeros: with ``γ = θ = 0`` they change
nothing before the next reset.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    """Where each token goes (all int32 / bool, per row ``b``).

    source: ``[B, S·C]``: the token each buffer row holds (``N`` for an unused row).
    destination: ``[B, N]``: the buffer row of each token (``S·C`` for an invalid one).
    resets: ``[B, S·C]``: the memory restarts from its initial state at this row.
    boundary: ``[B]``: buffer rows before the last document's last chunk boundary
      (``state_position`` of the op; 0 when the boundary is the document's start).
    fresh: ``[B]``: the last document's boundary state is the initial one (it does not
      continue the given state and has fewer than ``C`` tokens).
    open_tokens: ``[B]``: the last document's tokens after its last chunk boundary.
    document_tokens: ``[B]``: the last document's tokens.
    """

    source: jax.Array
    destination: jax.Array
    resets: jax.Array
    boundary: jax.Array
    fresh: jax.Array
    open_tokens: jax.Array
    document_tokens: jax.Array


def slots_for(length: int, chunk: int) -> int:
    """``S``: the slots of ``C`` rows that any packing of ``length`` tokens needs."""
    return 2 * (-(-length // chunk)) + 2


def compact_slots(length: int, chunk: int) -> int:
    """The smaller buffer tried first: ``⌈N/C⌉ + 2`` slots, enough whenever the
    documents waste at most two slots' worth of rows on their last chunks (a row of
    one to three documents always fits). :func:`used_rows` says whether it does."""
    return -(-length // chunk) + 2


def used_rows(layout: Layout, chunk: int) -> jax.Array:
    """The buffer rows that hold a token in some row of the batch, rounded up to whole
    slots (an int32 scalar). Rows past it hold none, and the chunk form is causal, so
    running it over the first ``used_rows`` rows gives the same outputs and boundary
    state as over the whole buffer."""
    rows = layout.source.shape[1]
    destination = layout.destination
    last = jnp.max(jnp.where(destination < rows, destination, 0))
    return (last // chunk + 1) * chunk


def _row_layout(starts: jax.Array, valid: jax.Array, chunk: int, continuing: bool) -> Layout:
    size = starts.shape[0]
    rows = slots_for(size, chunk) * chunk
    index = jnp.arange(size, dtype=jnp.int32)
    starts = starts & valid
    document = jnp.cumsum(starts.astype(jnp.int32))  # 0 for the first one
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=0)
    offset = index - first
    lengths = jnp.zeros((size,), jnp.int32).at[document].add(valid.astype(jnp.int32))
    exists = lengths > 0
    long = lengths > chunk
    if continuing:
        long = long.at[0].set(exists[0])
    exclusive = lambda a: jnp.cumsum(a) - a
    long_slots = jnp.where(long, -(-lengths // chunk), 0)
    short_start = jnp.sum(long_slots)
    short = exists & ~long
    before = exclusive(jnp.where(short, lengths, 0))  # P
    crossing = short & (before % chunk + lengths > chunk)
    own_start = short_start + -(-jnp.sum(jnp.where(short, lengths, 0)) // chunk)
    start = jnp.where(
        long,
        exclusive(long_slots) * chunk,
        jnp.where(
            crossing,
            (own_start + exclusive(crossing.astype(jnp.int32))) * chunk,
            short_start * chunk + before,
        ),
    )
    destination = jnp.where(valid, start[document] + offset, rows)
    source = jnp.full((rows,), size, jnp.int32).at[destination].set(index, mode="drop")
    begins = starts if continuing else starts | (index == 0)
    resets = jnp.zeros((rows,), bool).at[destination].set(begins, mode="drop")
    row = jnp.arange(rows)
    resets = resets | ((row >= short_start * chunk) & (row % chunk == 0))
    last = document[jnp.maximum(jnp.sum(valid.astype(jnp.int32)) - 1, 0)]
    total = lengths[last]
    closed = total // chunk * chunk
    continued = continuing & (last == 0)
    return Layout(
        source=source,
        destination=destination,
        resets=resets,
        boundary=jnp.where(closed > 0, start[last] + closed, 0),
        fresh=(closed == 0) & ~continued,
        open_tokens=total - closed,
        document_tokens=total,
    )


def document_layout(starts: jax.Array, valid: jax.Array, chunk: int, *, continuing: bool) -> Layout:
    """The :class:`Layout` of rows of ``N`` tokens (module docstring).

    Args:
      starts: bool ``[B, N]``: a document begins at this token (never token 0).
      valid: bool ``[B, N]``: real tokens (a prefix of each row).
      chunk: ``C``.
      continuing: the first document continues a state (it is not a fresh start, and
        its first token is on its chunk boundary).
    """
    return jax.vmap(lambda s, v: _row_layout(s, v, chunk, continuing))(starts, valid)


def scatter(stream: jax.Array, layout: Layout) -> jax.Array:
    """``[B, N, …]`` → the buffer ``[B, S·C, …]`` (zeros in unused rows)."""
    zeros = jnp.zeros((stream.shape[0], 1) + stream.shape[2:], stream.dtype)
    padded = jnp.concatenate([stream, zeros], axis=1)
    return jax.vmap(lambda a, i: a[i])(padded, layout.source)


def gather(buffer: jax.Array, layout: Layout) -> jax.Array:
    """The buffer ``[B, S·C, …]`` → the tokens ``[B, N, …]`` (an invalid token reads the
    last row)."""
    index = jnp.minimum(layout.destination, buffer.shape[1] - 1)
    return jax.vmap(lambda a, i: a[i])(buffer, index)
