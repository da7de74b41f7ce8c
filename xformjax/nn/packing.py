"""Documents packed into rows: what a mixer needs to keep them apart.

A packed row ``[T]`` holds several documents back to back, and maybe padding; two
int arrays ``[B, T]`` describe it (MaxText's packed batches carry the same two):

    segment_ids[b, t]   1, 2, … for the document token t belongs to; 0 for padding
    positions[b, t]     the token's index within its document (0 at its first token)

A document begins where the segment id changes (``starts``); ``document_index`` counts
the beginnings so far in the row, so two tokens belong to the same document exactly
when their indices are equal (ids need not increase). Every mixer takes
``segment_ids=`` and ``positions=`` and keeps documents apart:

- recurrences (the linear-attention and delta-rule families, the diagonal RNN, MoM,
  Titans, ATLAS, Aaren) start a document from the empty state. For the matrix
  memories that is a log-decay of :data:`RESET_LOG_GATE` added to the gate at the
  document's first token: ``exp`` of it is 0, so the state before is wiped, exactly.
  It is finite, so the chunk forms' differences of (compensated) log-decay sums stay
  finite: ``hi`` absorbs the reset (``−1e30 + g = −1e30``) and ``lo`` keeps every gate
  after it, so within a document ``(hi_i − hi_j) + (lo_i − lo_j)`` is the sum of its
  own gates, and across a reset it is ≤ −1e30 and ``exp`` gives 0 (a log-gate of
  ``−inf`` would give ``inf − inf``);
- short convolutions do not read inputs of an earlier document;
- softmax and sigmoid attention mask keys of other documents;
- RoPE and LRPE rotate by ``positions``.

Token 0 of a call never begins a document: it continues the state it is given (none
for a fresh sequence), so decoding a document in several calls is unchanged. A state's
``position`` counts every token of the row, so when a call continues the last document
of a packed call (or left-padded prompts), pass that document's ``positions``: derived
ones would continue from the row's token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.core import Tracer

from xformjax.nn.positional import token_positions
from xformjax.ops.common.gates import RESET_LOG_GATE

__all__ = ["RESET_LOG_GATE", "Packing", "derived_positions", "make_packing", "with_reset"]


@struct.dataclass
class Packing:
    """``segment_ids`` and ``positions``, int32 ``[B, T]`` (module docstring)."""

    segment_ids: jax.Array
    positions: jax.Array

    @property
    def starts(self) -> jax.Array:
        """bool ``[B, T]``: the token begins a new document (its segment id differs
        from the previous token's; never token 0)."""
        ids = self.segment_ids
        first = jnp.zeros_like(ids[:, :1], dtype=bool)
        return jnp.concatenate([first, ids[:, 1:] != ids[:, :-1]], axis=1)

    @property
    def document_index(self) -> jax.Array:
        """int32 ``[B, T]``: documents begun before or at each token (0 for the one the
        call continues); equal indices ⇔ same document."""
        return jnp.cumsum(self.starts.astype(jnp.int32), axis=1)

    def reset_log_gate(self, dtype=jnp.float32) -> jax.Array:
        """``[B, T]``: :data:`RESET_LOG_GATE` where a document begins, else 0."""
        return jnp.where(self.starts, jnp.asarray(RESET_LOG_GATE, dtype), jnp.zeros((), dtype))


def _check_ids(owner: str, name: str, ids, batch: int, length: int) -> jax.Array:
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
        got = getattr(ids, "dtype", type(ids).__name__)
        raise TypeError(f"{owner}: `{name}` must be an integer array [B, T]; got {got}")
    if tuple(ids.shape) != (batch, length):
        raise ValueError(
            f"{owner}: `{name}` must be [B, T] = [{batch}, {length}] like the input; "
            f"got shape {tuple(ids.shape)}"
        )
    # numpy, not jnp: a concrete array closed over by a jitted function is checked
    # without tracing (jnp.any would give a tracer there)
    if not isinstance(ids, Tracer) and bool(np.any(np.asarray(ids) < 0)):
        raise ValueError(f"{owner}: `{name}` must be ≥ 0; got {np.asarray(ids).min()}")
    return jnp.asarray(ids, jnp.int32)


def derived_positions(segment_ids: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """int32 ``[B, T]``: each token's index in its document; tokens before the first
    beginning continue from ``offset`` (the state's position)."""
    starts = Packing(segment_ids, segment_ids).starts
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)
    last_start = jax.lax.cummax(jnp.where(starts, index, -1), axis=1)
    continuing = token_positions(offset, length)[None]
    return jnp.where(last_start < 0, continuing, index - last_start)


def make_packing(
    owner: str,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    batch: int,
    length: int,
    offset: jax.Array | int = 0,
) -> Packing | None:
    """Check ``segment_ids`` and ``positions`` (``[B, T]`` integer arrays, ≥ 0) and
    bundle them; ``None`` when both are. Missing ``positions`` are derived from the
    segments (:func:`derived_positions`); missing ``segment_ids`` mean one document."""
    if segment_ids is None and positions is None:
        return None
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = _check_ids(owner, "segment_ids", segment_ids, batch, length)
    if positions is None:
        positions = derived_positions(segment_ids, offset)
    else:
        positions = _check_ids(owner, "positions", positions, batch, length)
    return Packing(segment_ids, positions)


def token_positions_of(packing: Packing | None, offset: jax.Array | int, length: int) -> jax.Array:
    """The positions a positional encoding rotates by: ``packing.positions`` ``[B, T]``,
    or ``offset + arange(T)`` ``[T]`` for an unpacked call."""
    return token_positions(offset, length) if packing is None else packing.positions


def with_reset(
    g: jax.Array | None, packing: Packing | None, shape: tuple[int, ...]
) -> jax.Array | None:
    """A per-token, per-head log-gate ``[B, T, H]`` that also wipes the state where a
    document begins: ``g`` (``None``, a head gate ``[H]`` or ``[B, T, H]``) plus
    :data:`RESET_LOG_GATE` there. ``shape`` is ``(B, T, H)``. Unpacked: ``g`` as is."""
    if packing is None:
        return g
    reset = packing.reset_log_gate()[:, :, None]
    if g is None:
        return jnp.broadcast_to(reset, shape)
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    return jnp.broadcast_to(g.astype(dtype) + reset.astype(dtype), shape)
