"""Which keys a query may attend to, and the sigmoid-attention bias.

Queries sit at the last ``Tq`` of the ``Tk`` key positions (``q_offset =
Tk − Tq``), so a single decoding query attends to the whole cache. A key at
position ``j`` is visible from a query at position ``i`` when both belong to the
same document (the same ``cu_seqlens`` sequence, or equal ``segment_ids``) and, if
``causal``, ``j ≤ i``; with a ``window`` ``w`` also ``i − j < w`` (causal) or
``|i − j| < w`` (bidirectional).

Document ids travel as ``[Bs, T]`` int arrays, ``Bs`` = B (``segment_ids``) or 1
(unpacked, or ``cu_seqlens``: one row shared by the batch), so every mask has a
leading batch axis that broadcasts against the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xformjax.ops.common import Segments


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Static masking rules; positions are in key coordinates."""

    causal: bool
    window: int | None
    q_offset: int | jax.Array
    kv_length: int | jax.Array | None = None
    kv_start: int | jax.Array | None = None  # keys before it are hidden (halo padding)

    def allowed(
        self, q_pos: jax.Array, k_pos: jax.Array, q_seq: jax.Array, k_seq: jax.Array
    ) -> jax.Array:
        """Broadcasting visibility test; ``*_seq`` are the document ids."""
        ok = q_seq == k_seq
        if self.causal:
            ok &= k_pos <= q_pos
        if self.window is not None:
            distance = q_pos - k_pos if self.causal else jnp.abs(q_pos - k_pos)
            ok &= distance < self.window
        if self.kv_length is not None:
            ok &= k_pos < self.kv_length
        if self.kv_start is not None:
            ok &= k_pos >= self.kv_start
        return ok


def sequence_ids(
    segments: Segments | None, segment_ids: jax.Array | None, num_keys: int
) -> jax.Array:
    """``[Bs, Tk]`` document id of every key position: ``segment_ids`` ``[B, Tk]``,
    the ``cu_seqlens`` sequence ``[1, Tk]``, or all zero ``[1, Tk]`` when unpacked."""
    if segment_ids is not None:
        return jnp.asarray(segment_ids, jnp.int32)
    if segments is not None:
        return segments.ids[None]
    return jnp.zeros((1, num_keys), jnp.int32)


def query_ids(k_seq: jax.Array, q_offset: int | jax.Array, num_queries: int) -> jax.Array:
    """``[Bs, Tq]``: the ids of the key positions the queries sit at (``q_offset …``)."""
    if isinstance(q_offset, int):
        return k_seq[:, q_offset : q_offset + num_queries]
    return jax.lax.dynamic_slice_in_dim(k_seq, q_offset, num_queries, axis=1)


def document_sizes(
    q_seq: jax.Array, k_seq: jax.Array, kv_length: int | jax.Array | None
) -> jax.Array:
    """``[Bs, Tq]``: how many keys (of the first ``kv_length``) share each query's id,
    in O((Tq + Tk) log Tk) (sorted ids, no ``Tq × Tk`` matrix)."""
    num_keys = k_seq.shape[1]
    if kv_length is not None:  # unfilled cache slots count for no document
        filled = jnp.arange(num_keys) < kv_length
        k_seq = jnp.where(filled, k_seq, jnp.iinfo(jnp.int32).max)
    ordered = jnp.sort(k_seq, axis=1)

    def count(row, queries):
        return jnp.searchsorted(row, queries, side="right") - jnp.searchsorted(
            row, queries, side="left"
        )

    return jax.vmap(count)(ordered, jnp.broadcast_to(q_seq, (ordered.shape[0], q_seq.shape[1])))


def sigmoid_bias(
    segments: Segments | None,
    segment_ids: jax.Array | None,
    q_seq: jax.Array,
    k_seq: jax.Array,
    kv_length: int | jax.Array | None,
    bias: float | jax.Array | None,
    dtype,
) -> jax.Array:
    """``[Bs, Tq]`` bias per query: ``bias`` if given (a number, ``[Tq]`` or
    ``[B, Tq]``), else ``−log n`` with ``n`` the keys of the query's document
    (``Tk``, or ``kv_length``, when unpacked; the ``cu_seqlens`` sequence's length)."""
    num_queries, num_keys = q_seq.shape[1], k_seq.shape[1]
    if bias is not None:
        bias = jnp.asarray(bias, dtype)
        return jnp.broadcast_to(bias, bias.shape[:-1] + (num_queries,)).reshape(-1, num_queries)
    if segment_ids is None and segments is None:
        n = num_keys if kv_length is None else kv_length
        return jnp.full((1, num_queries), -jnp.log(jnp.asarray(n, dtype)), dtype)
    return -jnp.log(document_sizes(q_seq, k_seq, kv_length).astype(dtype))
