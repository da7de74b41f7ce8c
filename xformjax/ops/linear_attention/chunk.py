"""Chunked form of linear attention: lightning-attention-2 tiling, linear in T.

Split the sequence into chunks of ``C`` tokens. Inside chunk ``n`` let
``b_i = Σ_{s ≤ i} log a_s`` (cumulative log decay from the chunk start, ≤ 0).
Then, with ``S_n`` the state entering the chunk::

    intra:  O_intra = (Q Kᵀ ⊙ exp(b_i − b_j) [j ≤ i]) V            (masked before exp)
    inter:  O_inter = (Q ⊙ exp(b)) S_n
    carry:  S_{n+1} = exp(b_C) ⊙ S_n + (K ⊙ exp(b_C − b))ᵀ V

Every exponent is ≤ 0, so nothing overflows however strong the gates are. For
the per-channel gate the intra-chunk term ``Σ_k q_ik k_jk exp(b_ik − b_jk)``
is built by secondary chunking: exact ``exp`` of masked differences inside
each sub-chunk, and across sub-chunks the factorisation
``exp(b_i − r)·exp(r − b_j)`` through the log decay ``r`` at the sub-chunk
boundary between them, both factors ≤ 1.

The per-chunk summaries are computed for all chunks at once; a ``lax.scan``
over chunks carries the K×V state. Memory is O(T·C + (T/C)·K·V).

Packed sequences (``cu_seqlens``) are laid out so that every chunk belongs to
one sequence: each sequence is padded to a multiple of ``C`` (zeros: no
contribution, no decay), so a chunk either continues its sequence's state or
starts from that sequence's initial state. The extra work is at most
``N·(C−1)`` tokens for ``N`` sequences. Final states are recomputed from the
state entering each sequence's last chunk over its valid tokens only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from xformjax.ops.common import Segments, round_up
from xformjax.ops.linear_attention.gates import LogGate

SUB_CHUNK = 16


def effective_chunk_size(chunk_size: int, num_tokens: int) -> int:
    """Don't tile a short sequence with a mostly empty chunk; keep sub-chunk alignment."""
    if chunk_size <= SUB_CHUNK:
        return chunk_size
    return min(chunk_size, round_up(num_tokens, SUB_CHUNK))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where tokens sit in the chunked, padded sequence, and where each final state ends.

    Attributes:
      chunk_size: ``C``.
      num_chunks: ``NC``; the padded length is ``NC·C``.
      dest: ``[T]`` padded position of every token (packed only, else identity).
      chunk_first: ``[NC]`` chunk starts its sequence (packed only).
      chunk_seq: ``[NC]`` sequence of each chunk (packed only).
      final_rows, final_chunks: ``[N]`` batch row and chunk holding each sequence's end.
      final_lengths: ``[N]`` valid tokens in that last chunk (``1..C``; 0 if empty).
    """

    chunk_size: int
    num_chunks: int
    dest: jax.Array | None
    chunk_first: jax.Array | None
    chunk_seq: jax.Array | None
    final_rows: jax.Array
    final_chunks: jax.Array
    final_lengths: jax.Array


def make_layout(batch: int, num_tokens: int, chunk_size: int,
                segments: Segments | None) -> ChunkLayout:
    if segments is None:
        num_chunks = -(-num_tokens // chunk_size)
        last_len = num_tokens - (num_chunks - 1) * chunk_size
        return ChunkLayout(chunk_size, num_chunks, None, None, None,
                           final_rows=jnp.arange(batch),
                           final_chunks=jnp.full((batch,), num_chunks - 1),
                           final_lengths=jnp.full((batch,), last_len))
    num_seq = segments.num_sequences
    padded_lengths = -(-segments.lengths // chunk_size) * chunk_size
    padded_ends = jnp.cumsum(padded_lengths)
    padded_starts = padded_ends - padded_lengths
    num_chunks = round_up(num_tokens + num_seq * (chunk_size - 1), chunk_size) // chunk_size
    positions = jnp.arange(num_tokens)
    dest = padded_starts[segments.ids] + positions - segments.starts[segments.ids]
    chunk_starts = jnp.arange(num_chunks) * chunk_size
    chunk_seq = jnp.minimum(jnp.searchsorted(padded_ends, chunk_starts, side="right"),
                            num_seq - 1)
    chunk_first = (chunk_starts == padded_starts[chunk_seq]) & (segments.lengths[chunk_seq] > 0)
    return ChunkLayout(chunk_size, num_chunks, dest, chunk_first, chunk_seq,
                       final_rows=jnp.zeros((num_seq,), jnp.int32),
                       final_chunks=jnp.maximum(padded_ends // chunk_size - 1, 0),
                       final_lengths=segments.lengths - padded_lengths + chunk_size
                       * (segments.lengths > 0))


def _to_chunks(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """``[B, T, H, ...]`` → ``[B, H, NC, C, ...]``, zero-padded per the layout."""
    padded_len = layout.num_chunks * layout.chunk_size
    if layout.dest is None:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, padded_len - x.shape[1])
        x = jnp.pad(x, pad)
    else:
        x = jnp.zeros((x.shape[0], padded_len) + x.shape[2:], x.dtype).at[:, layout.dest].set(x)
    x = x.reshape(x.shape[0], layout.num_chunks, layout.chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x: jax.Array, layout: ChunkLayout, num_tokens: int) -> jax.Array:
    """``[B, H, NC, C, V]`` → ``[B, T, H, V]``."""
    x = jnp.moveaxis(x, 1, 3).reshape(x.shape[0], -1, x.shape[1], x.shape[-1])
    return x[:, :num_tokens] if layout.dest is None else x[:, layout.dest]


def _cumulative_log_decay(gate: LogGate, layout: ChunkLayout) -> jax.Array:
    """``b`` inside each chunk: head ``[H, C]``; token ``[B, H, NC, C]``; channel
    ``[B, H, NC, C, K]``."""
    if gate.kind == "head":
        return gate.values[:, None] * jnp.arange(1, layout.chunk_size + 1, dtype=gate.values.dtype)
    return jnp.cumsum(_to_chunks(gate.values, layout), axis=3)


def _expand(b: jax.Array, gate: LogGate) -> jax.Array:
    """Broadcast ``b`` (or a slice of it) against ``[B, H, NC, C, K]``."""
    if gate.kind == "head":
        return b[None, :, None, :, None]
    return b[..., None] if gate.kind == "token" else b


def _scalar_gate_scores(q: jax.Array, k: jax.Array, b: jax.Array, gate: LogGate) -> jax.Array:
    size = q.shape[3]
    causal = jnp.tril(jnp.ones((size, size), bool))
    log_decay = b[..., :, None] - b[..., None, :]
    if gate.kind == "head":
        log_decay = log_decay[None, :, None]
    decay = jnp.exp(jnp.where(causal, log_decay, -jnp.inf))
    return jnp.einsum("bhnik,bhnjk->bhnij", q, k) * decay


def _channel_gate_scores(q: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """``A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk)`` for ``j ≤ i`` by secondary chunking."""
    *lead, size, key_dim = q.shape
    sub = math.gcd(size, SUB_CHUNK)
    num_sub = size // sub
    qs, ks, bs = (x.reshape(*lead, num_sub, sub, key_dim) for x in (q, k, b))

    within = jnp.tril(jnp.ones((sub, sub), bool))[..., None]
    diag_log = jnp.where(within, bs[..., :, None, :] - bs[..., None, :, :], -jnp.inf)
    diag = jnp.einsum("...sik,...sjk,...sijk->...sij", qs, ks, jnp.exp(diag_log))

    # Reference point of sub-chunk s: the log decay just before it (0 for the first).
    ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], axis=-2)
    q_ref = qs * jnp.exp(bs - ref[..., None, :])
    earlier = jnp.arange(size)[None, :] < (jnp.arange(num_sub) * sub)[:, None]
    k_log = jnp.where(earlier[..., None], ref[..., :, None, :] - b[..., None, :, :], -jnp.inf)
    k_ref = k[..., None, :, :] * jnp.exp(k_log)
    across = jnp.einsum("...sik,...sjk->...sij", q_ref, k_ref).reshape(*lead, size, size)
    block_diag = jnp.einsum("...sij,st->...sitj", diag, jnp.eye(num_sub, dtype=diag.dtype))
    return across + block_diag.reshape(*lead, size, size)


def _scan_states(state_updates: jax.Array, chunk_log_decay: jax.Array | None, gate: LogGate,
                 initial_state: jax.Array | None, layout: ChunkLayout,
                 state_shape: tuple[int, ...]) -> jax.Array:
    """States entering every chunk, ``[B, H, NC, K, V]``.

    ``S_{n+1} = exp(b_C) ⊙ S_n + ΔS_n``, restarting at each packed sequence.
    """
    updates = jnp.moveaxis(state_updates, 2, 0)
    decays = None if chunk_log_decay is None else jnp.moveaxis(jnp.exp(chunk_log_decay), 2, 0)
    head_decay = jnp.exp(gate.values * layout.chunk_size) if gate.kind == "head" else None
    zeros = jnp.zeros(state_shape, state_updates.dtype)
    packed = layout.dest is not None
    inits = initial_state if initial_state is not None else (
        jnp.zeros((layout.final_rows.shape[0],) + state_shape[1:], zeros.dtype))

    def step(state, xs):
        update, decay, first, seq = xs
        if packed:
            state = jnp.where(first, inits[seq][None], state)
        if gate.kind == "head":
            decayed = state * head_decay[None, :, None, None]
        elif gate.kind == "token":
            decayed = state * decay[..., None, None]
        else:
            decayed = state * decay[..., None]
        return decayed + update, state

    state0 = zeros if packed or initial_state is None else initial_state
    _, entering = jax.lax.scan(step, state0, (updates, decays, layout.chunk_first,
                                              layout.chunk_seq))
    return jnp.moveaxis(entering, 0, 2)


def _final_states(entering: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array,
                  gate: LogGate, layout: ChunkLayout, initial_state: jax.Array | None,
                  segments: Segments | None) -> jax.Array:
    """Each sequence's state after its last valid token, ``[N, H, K, V]``."""
    rows, chunks, lengths = layout.final_rows, layout.final_chunks, layout.final_lengths
    state = entering[rows, :, chunks]
    k_last, v_last = k[rows, :, chunks], v[rows, :, chunks]  # [N, H, C, D]
    last_index = jnp.maximum(lengths - 1, 0)
    num = rows.shape[0]
    if gate.kind == "head":
        b_chunk = jnp.broadcast_to(b, (num,) + b.shape)  # [N, H, C]
    else:
        b_chunk = b[rows, :, chunks]  # [N, H, C] or [N, H, C, K]
    b_end = b_chunk[jnp.arange(num), :, last_index]  # [N, H] or [N, H, K]
    valid = jnp.arange(layout.chunk_size)[None, :] < lengths[:, None]  # [N, C]
    if gate.kind == "channel":
        log_to_end = jnp.where(valid[:, None, :, None], b_end[:, :, None] - b_chunk, -jnp.inf)
        state_decay = jnp.exp(b_end)[..., None]
    else:
        log_to_end = jnp.where(valid[:, None], b_end[..., None] - b_chunk, -jnp.inf)[..., None]
        state_decay = jnp.exp(b_end)[..., None, None]
    finals = state_decay * state + jnp.einsum("nhck,nhcv->nhkv",
                                              k_last * jnp.exp(log_to_end), v_last)
    if segments is not None:
        before = (initial_state if initial_state is not None else jnp.zeros_like(finals))
        finals = jnp.where((segments.lengths == 0)[:, None, None, None], before, finals)
    return finals


def linear_attention_chunk(q: jax.Array, k: jax.Array, v: jax.Array, gate: LogGate,
                           initial_state: jax.Array | None, segments: Segments | None,
                           chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Chunked linear attention; arguments and results as the recurrent form."""
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    layout = make_layout(batch, num_tokens, effective_chunk_size(chunk_size, num_tokens),
                         segments)
    qc, kc, vc = (_to_chunks(x, layout) for x in (q, k, v))  # [B, H, NC, C, D]
    b = _cumulative_log_decay(gate, layout)

    if gate.kind == "channel":
        scores = _channel_gate_scores(qc, kc, b)
        b_last = b[..., -1, :]  # [B, H, NC, K]
    else:
        scores = _scalar_gate_scores(qc, kc, b, gate)
        b_last = b[..., -1]  # [H] or [B, H, NC]
    out = jnp.einsum("bhnij,bhnjv->bhniv", scores, vc)

    b_full = _expand(b, gate)
    b_last_full = _expand(b_last[..., None] if gate.kind != "channel" else b_last[..., None, :],
                          gate)
    k_to_end = kc * jnp.exp(b_last_full - b_full)
    updates = jnp.einsum("bhnck,bhncv->bhnkv", k_to_end, vc)
    entering = _scan_states(updates, None if gate.kind == "head" else b_last, gate,
                            initial_state, layout, (batch, heads, key_dim, value_dim))
    out = out + jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(b_full), entering)

    finals = _final_states(entering, kc, vc, b, gate, layout, initial_state, segments)
    return _from_chunks(out, layout, num_tokens), finals
