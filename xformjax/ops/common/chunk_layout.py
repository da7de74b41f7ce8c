"""Where tokens sit in the chunked, blocked sequence (packing included).

The chunk engine (:mod:`.chunk_scan`) splits ``T`` tokens into chunks of ``C``
and walks *blocks* of ``G`` chunks (about ``BLOCK_TOKENS`` tokens) with an outer
``lax.scan``. Packed sequences (``cu_seqlens``) are laid out so that every chunk
belongs to one sequence: each sequence is padded to a multiple of ``C`` (zeros:
no contribution, no decay), so a chunk either continues its sequence's state or
starts from that sequence's initial state. The extra work is at most
``N·(C−1)`` tokens for ``N`` sequences.

Array layouts used by the engine and both families' block steps:

* token layout ``[B, T, H, D]`` (the op's), padded to ``[B, L, H, D]`` with
  ``L = num_blocks·G·C``;
* blocked ``[num_blocks, B, G·C, H, D]`` (the outer scan's ``xs``);
* head-major, one block: ``[B, H, G, C, D]`` (what the per-chunk algebra uses).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xformjax.ops.common.channel_scores import SUB_CHUNK
from xformjax.ops.common.validation import Segments, round_up

BLOCK_TOKENS = 512


def effective_chunk_size(chunk_size: int, num_tokens: int) -> int:
    """Don't tile a short sequence with a mostly empty chunk; keep sub-chunk alignment."""
    if chunk_size <= SUB_CHUNK:
        return chunk_size
    return min(chunk_size, round_up(num_tokens, SUB_CHUNK))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where tokens sit in the padded, chunked sequence, and where each final state ends.

    Attributes:
      chunk_size: ``C``.
      chunks_per_block: ``G``, chunks per outer scan step.
      num_blocks: outer steps; the padded length is ``num_blocks·G·C``.
      dest: ``[T]`` padded position of every token (packed only; else identity).
      chunk_first: ``[num_blocks·G]`` chunk starts its sequence (packed only).
      chunk_seq: ``[num_blocks·G]`` sequence of each chunk (packed only).
      final_rows, final_chunks: ``[N]`` batch row and chunk holding each sequence's end.
      final_lengths: ``[N]`` valid tokens in that last chunk (``1..C``; 0 if empty).
      chunk_rank: ``[num_blocks·G]`` chunks of the same sequence before each chunk.
    """

    chunk_size: int
    chunks_per_block: int
    num_blocks: int
    dest: jax.Array | None
    chunk_first: jax.Array | None
    chunk_seq: jax.Array | None
    final_rows: jax.Array
    final_chunks: jax.Array
    final_lengths: jax.Array
    chunk_rank: jax.Array

    @property
    def packed(self) -> bool:
        return self.dest is not None

    @property
    def padded_length(self) -> int:
        return self.num_blocks * self.chunks_per_block * self.chunk_size

    @property
    def block_length(self) -> int:
        return self.chunks_per_block * self.chunk_size

    def pad(self, x: jax.Array) -> jax.Array:
        """``[B, T, ...]`` → ``[B, L, ...]`` (zeros where no token sits)."""
        if self.dest is None:
            pad = [(0, 0)] * x.ndim
            pad[1] = (0, self.padded_length - x.shape[1])
            return jnp.pad(x, pad)
        zeros = jnp.zeros((x.shape[0], self.padded_length) + x.shape[2:], x.dtype)
        return zeros.at[:, self.dest].set(x)

    def unpad(self, x: jax.Array, num_tokens: int) -> jax.Array:
        """``[B, L, ...]`` → the ``[B, T, ...]`` tokens (inverse of :meth:`pad`)."""
        return x[:, :num_tokens] if self.dest is None else x[:, self.dest]

    def blocks(self, x: jax.Array) -> jax.Array:
        """Padded ``[B, L, ...]`` → ``[num_blocks, B, G·C, ...]`` for the outer scan."""
        x = x.reshape(x.shape[0], self.num_blocks, self.block_length, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def unblock(self, x: jax.Array) -> jax.Array:
        """``[num_blocks, B, G·C, ...]`` → padded ``[B, L, ...]`` (inverse of :meth:`blocks`)."""
        return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], self.padded_length) + x.shape[3:])

    def chunk_flags(self, x: jax.Array | None) -> jax.Array | None:
        """A per-chunk ``[num_blocks·G]`` array as ``[num_blocks, G]`` (``None`` stays)."""
        return None if x is None else x.reshape(self.num_blocks, self.chunks_per_block)

    def head_major(self, x: jax.Array) -> jax.Array:
        """One block ``[B, G·C, H, ...]`` → ``[B, H, G, C, ...]``."""
        x = x.reshape(x.shape[0], self.chunks_per_block, self.chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)


def token_major(x: jax.Array) -> jax.Array:
    """One block ``[B, H, G, C, D]`` → ``[B, G·C, H, D]`` (inverse of ``head_major``)."""
    return jnp.moveaxis(x, 1, 3).reshape(x.shape[0], -1, x.shape[1], x.shape[-1])


def token_major_rows(x: jax.Array) -> jax.Array:
    """One block ``[B, H, G, C]`` (a scalar per token) → ``[B, G·C, H]``."""
    return jnp.moveaxis(x, 1, 3).reshape(x.shape[0], -1, x.shape[1])


def make_layout(
    batch: int, num_tokens: int, chunk_size: int, segments: Segments | None
) -> ChunkLayout:
    """The layout of ``batch`` rows of ``num_tokens`` tokens (or one packed row)."""
    if segments is None:
        num_chunks = -(-num_tokens // chunk_size)
    else:
        num_seq = segments.num_sequences
        num_chunks = round_up(num_tokens + num_seq * (chunk_size - 1), chunk_size) // chunk_size
    per_block = max(1, min(BLOCK_TOKENS // chunk_size, num_chunks))
    num_blocks = -(-num_chunks // per_block)
    if segments is None:
        last_len = num_tokens - (num_chunks - 1) * chunk_size
        return ChunkLayout(
            chunk_size,
            per_block,
            num_blocks,
            None,
            None,
            None,
            final_rows=jnp.arange(batch),
            final_chunks=jnp.full((batch,), num_chunks - 1),
            final_lengths=jnp.full((batch,), last_len),
            chunk_rank=jnp.arange(num_blocks * per_block),
        )
    padded_lengths = -(-segments.lengths // chunk_size) * chunk_size
    padded_ends = jnp.cumsum(padded_lengths)
    padded_starts = padded_ends - padded_lengths
    dest = padded_starts[segments.ids] + jnp.arange(num_tokens) - segments.starts[segments.ids]
    chunk_starts = jnp.arange(num_blocks * per_block) * chunk_size
    chunk_seq = jnp.minimum(jnp.searchsorted(padded_ends, chunk_starts, side="right"), num_seq - 1)
    chunk_first = (chunk_starts == padded_starts[chunk_seq]) & (segments.lengths[chunk_seq] > 0)
    return ChunkLayout(
        chunk_size,
        per_block,
        num_blocks,
        dest,
        chunk_first,
        chunk_seq,
        final_rows=jnp.zeros((num_seq,), jnp.int32),
        final_chunks=jnp.maximum(padded_ends // chunk_size - 1, 0),
        final_lengths=segments.lengths - padded_lengths + chunk_size * (segments.lengths > 0),
        chunk_rank=(chunk_starts - padded_starts[chunk_seq]) // chunk_size,
    )
