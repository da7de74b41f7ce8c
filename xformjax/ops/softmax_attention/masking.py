"""Which keys a query may attend to, and the sigmoid-attention bias.

Queries sit at the last ``Tq`` of the ``Tk`` key positions (``q_offset =
Tk − Tq``), so a single decoding query attends to the whole cache. A key at
position ``j`` is visible from a query at position ``i`` when both belong to the
same packed sequence and, if ``causal``, ``j ≤ i``; with a ``window`` ``w`` also
``i − j < w`` (causal) or ``|i − j| < w`` (bidirectional).
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
        """Broadcasting visibility test; ``*_seq`` are the packed-sequence ids."""
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


def sequence_ids(segments: Segments | None, num_keys: int) -> jax.Array:
    """``[Tk]`` packed-sequence id of every key position (all zero when unpacked)."""
    return jnp.zeros((num_keys,), jnp.int32) if segments is None else segments.ids


def sigmoid_bias(
    segments: Segments | None,
    num_keys: int,
    q_offset: int,
    num_queries: int,
    bias: float | jax.Array | None,
    dtype,
) -> jax.Array:
    """``[Tq]`` bias per query: ``bias`` if given, else ``−log n`` with n the query's
    sequence length (``Tk`` when unpacked)."""
    if bias is not None:
        return jnp.full((num_queries,), bias, dtype)
    if segments is None:
        return jnp.full((num_queries,), -jnp.log(jnp.asarray(num_keys, dtype)), dtype)
    lengths = segments.lengths[segments.ids[q_offset:]]
    return -jnp.log(lengths.astype(dtype))
