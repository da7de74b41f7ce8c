"""Chunked form of linear attention: lightning-attention-2 tiling, linear in T.

Split the sequence into chunks of ``C`` tokens. Inside chunk ``n`` let
``b_i = Σ_{s ≤ i} log a_s`` (cumulative log decay from the chunk start, ≤ 0).
Then, with ``S_n`` the state entering the chunk::

    intra:  O_intra = (Q Kᵀ ⊙ exp(b_i − b_j) [j ≤ i]) V            (masked before exp)
    inter:  O_inter = (Q ⊙ exp(b)) S_n
    carry:  S_{n+1} = exp(b_C) ⊙ S_n + (K ⊙ exp(b_C − b))ᵀ V

Every exponent is ≤ 0, so nothing overflows however strong the gates are. For
the per-channel gate the intra-chunk term ``Σ_k q_ik k_jk exp(b_ik − b_jk)``
is built by secondary chunking (``channel_scores.py``, with its own VJP):
exact ``exp`` of masked differences inside each sub-chunk, and across
sub-chunks the factorisation ``exp(b_i − r)·exp(r − b_j)`` through the log
decay ``r`` at the sub-chunk boundary between them, both factors ≤ 1.

Execution: an outer ``lax.scan`` walks over *blocks* of ``G`` chunks (about
``BLOCK_TOKENS`` tokens), carrying the K×V state. Each step does the batched
intra-chunk matmuls for its ``G`` chunks, an inner scan over them for the
states, and the inter-chunk outputs; every intermediate is the size of one
block, so it stays in cache and the time per token does not depend on T.

Backward: for scalar gates (none, ``[H]``, ``[B, T, H]``) hand-written VJPs
(``chunk_backward.py`` for linear attention, ``delta_rule/chunk_backward.py`` for the
delta rule) keep only the inputs and the state entering each chunk (and the
delta rule's pseudo-values, an output anyway), O(T·D + (T/C)·K·V), and run the
mirror-image reverse scan. The per-channel gate is differentiated by JAX with
each block rematerialised, except for its intra-chunk scores, which carry their
own VJP (``channel_scores.py``).

Packed sequences (``cu_seqlens``) are laid out so that every chunk belongs to
one sequence: each sequence is padded to a multiple of ``C`` (zeros: no
contribution, no decay), so a chunk either continues its sequence's state or
starts from that sequence's initial state. The extra work is at most
``N·(C−1)`` tokens for ``N`` sequences. Final states are recomputed from the
state entering each sequence's last chunk, over its valid tokens only.
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp

from xformjax.ops.common import Segments, round_up
from xformjax.ops.common.channel_scores import (SUB_CHUNK, channel_gate_scores,
                                                             diagonal_blocks)
from xformjax.ops.linear_attention.chunk_backward import make_backward_step
from xformjax.ops.delta_rule.chunk_backward import make_delta_backward_step
from xformjax.ops.common.gates import LogGate, cumulative_sum

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
    def padded_length(self) -> int:
        return self.num_blocks * self.chunks_per_block * self.chunk_size

    @property
    def block_length(self) -> int:
        return self.chunks_per_block * self.chunk_size


def make_layout(batch: int, num_tokens: int, chunk_size: int,
                segments: Segments | None) -> ChunkLayout:
    if segments is None:
        num_chunks = -(-num_tokens // chunk_size)
    else:
        num_seq = segments.num_sequences
        num_chunks = round_up(num_tokens + num_seq * (chunk_size - 1), chunk_size) // chunk_size
    per_block = max(1, min(BLOCK_TOKENS // chunk_size, num_chunks))
    num_blocks = -(-num_chunks // per_block)
    if segments is None:
        last_len = num_tokens - (num_chunks - 1) * chunk_size
        return ChunkLayout(chunk_size, per_block, num_blocks, None, None, None,
                           final_rows=jnp.arange(batch),
                           final_chunks=jnp.full((batch,), num_chunks - 1),
                           final_lengths=jnp.full((batch,), last_len),
                           chunk_rank=jnp.arange(num_blocks * per_block))
    padded_lengths = -(-segments.lengths // chunk_size) * chunk_size
    padded_ends = jnp.cumsum(padded_lengths)
    padded_starts = padded_ends - padded_lengths
    dest = (padded_starts[segments.ids] + jnp.arange(num_tokens)
            - segments.starts[segments.ids])
    chunk_starts = jnp.arange(num_blocks * per_block) * chunk_size
    chunk_seq = jnp.minimum(jnp.searchsorted(padded_ends, chunk_starts, side="right"),
                            num_seq - 1)
    chunk_first = (chunk_starts == padded_starts[chunk_seq]) & (segments.lengths[chunk_seq] > 0)
    return ChunkLayout(chunk_size, per_block, num_blocks, dest, chunk_first, chunk_seq,
                       final_rows=jnp.zeros((num_seq,), jnp.int32),
                       final_chunks=jnp.maximum(padded_ends // chunk_size - 1, 0),
                       final_lengths=segments.lengths - padded_lengths
                       + chunk_size * (segments.lengths > 0),
                       chunk_rank=(chunk_starts - padded_starts[chunk_seq]) // chunk_size)


def _pad(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """``[B, T, ...]`` → ``[B, padded_length, ...]`` (zeros where no token sits)."""
    if layout.dest is None:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, layout.padded_length - x.shape[1])
        return jnp.pad(x, pad)
    zeros = jnp.zeros((x.shape[0], layout.padded_length) + x.shape[2:], x.dtype)
    return zeros.at[:, layout.dest].set(x)


def _blocks(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """Padded ``[B, L, ...]`` → ``[num_blocks, B, G·C, ...]`` for the outer scan."""
    x = x.reshape(x.shape[0], layout.num_blocks, layout.block_length, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _head_major(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """One block ``[B, G·C, H, ...]`` → ``[B, H, G, C, ...]``."""
    x = x.reshape(x.shape[0], layout.chunks_per_block, layout.chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _cumulative_log_decay(gate: LogGate, log_a: jax.Array | None, chunk_size: int) -> jax.Array:
    """``b`` inside each chunk: head ``[H, C]``; token ``[B, H, G, C]``; channel
    ``[B, H, G, C, K]`` (``log_a`` is the block's gate, head-major)."""
    if gate.kind == "head":
        return gate.values[:, None] * jnp.arange(1, chunk_size + 1, dtype=gate.values.dtype)
    return cumulative_sum(log_a, axis=3)


def _expand(b: jax.Array, kind: str) -> jax.Array:
    """Broadcast ``b`` (or a slice of it, keeping the C axis) against ``[B, H, G, C, K]``."""
    if kind == "head":
        return b[None, :, None, :, None]
    return b[..., None] if kind == "token" else b


def _scalar_decay_mask(b: jax.Array, kind: str) -> jax.Array:
    """``M_ij = exp(b_i − b_j)[j ≤ i]``, masked before ``exp``: ``[B|1, H, G|1, C, C]``."""
    size = b.shape[-1]
    causal = jnp.tril(jnp.ones((size, size), bool))
    log_decay = b[..., :, None] - b[..., None, :]
    if kind == "head":
        log_decay = log_decay[None, :, None]
    return jnp.exp(jnp.where(causal, log_decay, -jnp.inf))


def _scalar_gate_scores(q: jax.Array, k: jax.Array, b: jax.Array, kind: str) -> jax.Array:
    return jnp.einsum("bhnik,bhnjk->bhnij", q, k) * _scalar_decay_mask(b, kind)


def _substitution_inverse(a: jax.Array) -> jax.Array:
    """``(I + A)⁻¹`` for small strictly lower-triangular ``A``, row by row:
    ``t_i = e_i − Σ_{j<i} A_ij t_j``."""
    size = a.shape[-1]

    def row(t, i):
        t_i = jnp.eye(size, dtype=a.dtype)[i] - jnp.einsum("...j,...jd->...d", a[..., i, :], t)
        return t.at[..., i, :].set(t_i), None

    inverse, _ = jax.lax.scan(row, jnp.zeros_like(a), jnp.arange(size))
    return inverse


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``T = (I + A)⁻¹`` for strictly lower-triangular ``A`` ``[.., C, C]``.

    Forward: substitution inside 16×16 diagonal blocks, then pairs of blocks
    merged by ``T₂₁ = −T₂₂ A₂₁ T₁₁`` (matmuls, log₂ depth). Backward:
    ``dA = −tril(Tᵀ dT Tᵀ, −1)``, matmuls only. (Differentiating
    ``jax.scipy.linalg.solve_triangular`` deadlocks XLA:CPU on jaxlib 0.10.2.)
    """
    size = a.shape[-1]
    block = math.gcd(size, SUB_CHUNK)
    padded = block * 2 ** math.ceil(math.log2(size // block))
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, padded - size)] * 2)
    inverse = _substitution_inverse(diagonal_blocks(a, block))  # [.., n, s, s]
    while inverse.shape[-3] > 1:
        pairs = inverse.reshape(inverse.shape[:-3] + (-1, 2) + inverse.shape[-2:])
        first, second = pairs[..., 0, :, :], pairs[..., 1, :, :]
        width = 2 * inverse.shape[-1]
        below = diagonal_blocks(a, width)[..., width // 2:, :width // 2]
        lower = -jnp.einsum("...ij,...jk,...kl->...il", second, below, first)
        top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
        bottom = jnp.concatenate([lower, second], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
    return inverse[..., 0, :size, :size]


def _unit_lower_inverse_fwd(a):
    inverse = unit_lower_inverse(a)
    return inverse, inverse


def _unit_lower_inverse_bwd(inverse, d_inverse):
    size = inverse.shape[-1]
    d_a = -jnp.einsum("...ji,...jk,...lk->...il", inverse, d_inverse, inverse)
    return (jnp.where(jnp.tril(jnp.ones((size, size), bool), -1), d_a, 0.0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _decay_state(state: jax.Array, kind: str, decay: jax.Array) -> jax.Array:
    """Multiply ``[B, H, K, V]`` by a per-head ``[H]``, ``[B, H]`` or ``[B, H, K]`` decay."""
    if kind == "head":
        return state * decay[None, :, None, None]
    return state * (decay[..., None, None] if kind == "token" else decay[..., None])


def _block_step(gate: LogGate, layout: ChunkLayout, inits: jax.Array | None):
    """The outer-scan body: ``G`` chunks given the state entering the first.

    Linear attention adds ``(K ⊙ e^{b_C − b})ᵀ V`` per chunk. With ``beta`` in the
    scan inputs it runs the delta rule in the WY/UT form instead: per chunk
    ``A = tril(diag(β) (K ⊙ e^b)(K ⊙ e^{−b})ᵀ, −1)`` (built like the scores,
    exponents ≤ 0), ``[W | U₀] = (I + A)⁻¹ diag(β) [K ⊙ e^b | V]``, and with the
    entering state S the pseudo-values ``U = U₀ − W S`` take the place of V.
    The step then also returns U in token layout (for the final states).
    """
    kind, packed = gate.kind, layout.dest is not None
    head_decay = jnp.exp(gate.values * layout.chunk_size) if kind == "head" else None
    size = layout.chunk_size

    def scores_of(x, y, b):
        if kind == "channel":
            return channel_gate_scores(x, y, b)
        return _scalar_gate_scores(x, y, b, kind)

    def step(state, xs):
        q, k, v, log_a, first, seq, beta = xs
        qc, kc, vc = (_head_major(x, layout) for x in (q, k, v))  # [B, H, G, C, D]
        b = _cumulative_log_decay(gate, None if log_a is None else _head_major(log_a, layout),
                                  size)
        b_last = b[..., -1:, :] if kind == "channel" else b[..., -1:]
        b_full, b_last_full = _expand(b, kind), _expand(b_last, kind)
        k_to_end = kc * jnp.exp(b_last_full - b_full)
        chunk_decay = (head_decay if kind == "head"
                       else jnp.moveaxis(jnp.exp(b_last[..., 0, :] if kind == "channel"
                                                 else b_last[..., 0]), 2, 0))
        scores = scores_of(qc, kc, b)
        delta = beta is not None
        if delta:
            betac = _head_major(beta, layout)[..., None]  # [B, H, G, C, 1]
            strictly = jnp.tril(jnp.ones((size, size), bool), -1)
            a = jnp.where(strictly, scores_of(kc, kc, b), 0.0) * betac
            transform = unit_lower_inverse(a)  # [B, H, G, C, C]
            w = jnp.einsum("bhnij,bhnjk->bhnik", transform, betac * kc * jnp.exp(b_full))
            u0 = jnp.einsum("bhnij,bhnjv->bhniv", transform, betac * vc)
            per_chunk = (w, u0, k_to_end)
        else:
            per_chunk = (jnp.einsum("bhnck,bhncv->bhnkv", k_to_end, vc),)

        def inner(carry, xs_n):
            chunk, decay, first_n, seq_n = xs_n
            if packed:
                carry = jnp.where(first_n, inits[seq_n][None], carry)
            decay = head_decay if kind == "head" else decay
            if delta:
                w, u0, k_end = chunk
                values = u0 - jnp.einsum("bhck,bhkv->bhcv", w, carry)
                update = jnp.einsum("bhck,bhcv->bhkv", k_end, values)
            else:
                (update,), values = chunk, None
            return _decay_state(carry, kind, decay) + update, (carry, values)

        state, (entering, values) = jax.lax.scan(
            inner, state, (tuple(jnp.moveaxis(x, 2, 0) for x in per_chunk),
                           None if kind == "head" else chunk_decay, first, seq))
        entering = jnp.moveaxis(entering, 0, 2)  # [B, H, G, K, V]
        values = vc if values is None else jnp.moveaxis(values, 0, 2)
        out = (jnp.einsum("bhnij,bhnjv->bhniv", scores, values)
               + jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(b_full), entering))
        tokens = lambda x: jnp.moveaxis(x, 1, 3).reshape(x.shape[0], layout.block_length,
                                                         x.shape[1], x.shape[-1])
        return state, (tokens(out), entering, tokens(values) if delta else None)

    return step


def _final_states(entering: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array | None,
                  gate: LogGate, layout: ChunkLayout, initial_state: jax.Array | None,
                  segments: Segments | None) -> jax.Array:
    """Each sequence's state after its last valid token, ``[N, H, K, V]``.

    ``entering`` is ``[num_blocks, B, H, G, K, V]``; ``k``, ``v``, ``log_a`` are the
    padded ``[B, L, H, ...]`` inputs.
    """
    rows, chunks, lengths = layout.final_rows, layout.final_chunks, layout.final_lengths
    size, num = layout.chunk_size, rows.shape[0]
    per_block = layout.chunks_per_block
    state = entering[chunks // per_block, rows, :, chunks % per_block]  # [N, H, K, V]
    token_index = chunks[:, None] * size + jnp.arange(size)  # [N, C]
    gather = lambda x: jnp.moveaxis(x[rows[:, None], token_index], 1, 2)  # [N, H, C, ...]
    k_last, v_last = gather(k), gather(v)
    if gate.kind == "head":
        b_chunk = jnp.broadcast_to(_cumulative_log_decay(gate, None, size), (num,) + (
            gate.values.shape[0], size))
    else:
        b_chunk = cumulative_sum(gather(log_a), axis=2)  # [N, H, C] or [N, H, C, K]
    last_index = jnp.maximum(lengths - 1, 0)
    b_end = b_chunk[jnp.arange(num), :, last_index]  # [N, H] or [N, H, K]
    valid = jnp.arange(size)[None, :] < lengths[:, None]  # [N, C]
    if gate.kind == "channel":
        log_to_end = jnp.where(valid[:, None, :, None], b_end[:, :, None] - b_chunk, -jnp.inf)
        state_decay = jnp.exp(b_end)[..., None]
    else:
        log_to_end = jnp.where(valid[:, None], b_end[..., None] - b_chunk, -jnp.inf)[..., None]
        state_decay = jnp.exp(b_end)[..., None, None]
    finals = state_decay * state + jnp.einsum("nhck,nhcv->nhkv",
                                              k_last * jnp.exp(log_to_end), v_last)
    if segments is not None:
        before = initial_state if initial_state is not None else jnp.zeros_like(finals)
        finals = jnp.where((segments.lengths == 0)[:, None, None, None], before, finals)
    return finals


def _block_inputs(layout: ChunkLayout, q, k, v, log_a, first, seq, beta=None) -> tuple:
    """The outer scan's ``xs``: token arrays as ``[num_blocks, B, G·C, ...]``, per-chunk
    flags as ``[num_blocks, G]`` (``None`` stays ``None``)."""
    flags = [None if x is None else x.reshape(layout.num_blocks, layout.chunks_per_block)
             for x in (first, seq)]
    return (_blocks(q, layout), _blocks(k, layout), _blocks(v, layout),
            None if log_a is None else _blocks(log_a, layout), *flags,
            None if beta is None else _blocks(beta, layout))


def _scalar_gate(kind: str, head_gate: jax.Array | None) -> LogGate:
    """The scalar gate of a core: the ``[H]`` values for ``"head"``, a placeholder otherwise
    (token gates travel blockwise as ``log_a``)."""
    return LogGate(kind, head_gate if kind == "head" else jnp.zeros((1,)))


def _backward_helpers(kind: str, layout: ChunkLayout, head_gate: jax.Array | None):
    """The layout and decay functions the hand-written backward steps use."""
    return types.SimpleNamespace(
        head_major=lambda x: _head_major(x, layout),
        cumulative=lambda log_a: _cumulative_log_decay(_scalar_gate(kind, head_gate), log_a,
                                                       layout.chunk_size),
        expand=lambda b: _expand(b, kind),
        decay_mask=lambda b: _scalar_decay_mask(b, kind),
        decay_state=lambda state, decay: _decay_state(state, kind, decay),
        inverse=unit_lower_inverse)


def _scalar_gate_core(kind: str, layout: ChunkLayout, num_sequences: int | None):
    """Blocked chunk scan with the hand-written backward of ``chunk_backward.py``.

    ``core(q, k, v, log_a, head_gate, state0, inits, first, seq, rank)`` takes the
    padded ``[B, L, H, D]`` inputs and returns ``(out, entering)``.
    """

    def forward(q, k, v, log_a, head_gate, state0, inits, first, seq, rank):
        step = _block_step(_scalar_gate(kind, head_gate), layout, inits)
        xs = _block_inputs(layout, q, k, v, log_a, first, seq)
        _, (out, entering, _) = jax.lax.scan(step, state0, xs)
        out = jnp.moveaxis(out, 0, 1).reshape(q.shape[:3] + (v.shape[-1],))
        return out, entering

    @jax.custom_vjp
    def core(q, k, v, log_a, head_gate, state0, inits, first, seq, rank):
        return forward(q, k, v, log_a, head_gate, state0, inits, first, seq, rank)

    def core_fwd(q, k, v, log_a, head_gate, state0, inits, first, seq, rank):
        out, entering = forward(q, k, v, log_a, head_gate, state0, inits, first, seq, rank)
        return (out, entering), (q, k, v, log_a, head_gate, state0, inits, first, seq, rank,
                                 entering)

    def core_bwd(residuals, cotangents):
        q, k, v, log_a, head_gate, state0, inits, first, seq, rank, entering = residuals
        d_out, d_entering = cotangents
        helpers = _backward_helpers(kind, layout, head_gate)
        step = make_backward_step(kind, layout, helpers, head_gate, num_sequences)
        blocks = _block_inputs(layout, q, k, v, log_a, first, seq)
        rank_blocks = (None if kind != "head"
                       else rank.reshape(layout.num_blocks, layout.chunks_per_block))
        xs = (*blocks[:4], _blocks(d_out, layout), d_entering, entering, *blocks[4:6],
              rank_blocks)
        carry = (jnp.zeros_like(state0),
                 None if kind == "head" else jnp.zeros(state0.shape[:2], state0.dtype),
                 None if inits is None else jnp.zeros_like(inits),
                 None if kind != "head" else jnp.zeros_like(head_gate))
        (d_state0, _, d_inits, d_head), grads = jax.lax.scan(step, carry, xs, reverse=True)
        unblock = lambda x: None if x is None else jnp.moveaxis(x, 0, 1).reshape(
            (x.shape[1], layout.padded_length) + x.shape[3:])
        dq, dk, dv, d_log_a = (unblock(x) for x in grads)
        return dq, dk, dv, d_log_a, d_head, d_state0, d_inits, None, None, None

    core.defvjp(core_fwd, core_bwd)
    return core


def _delta_core(kind: str, layout: ChunkLayout, num_sequences: int | None):
    """Blocked chunked delta rule (scalar gates) with the hand-written backward of
    ``delta_rule/chunk_backward.py``.

    ``core(q, k, v, beta, log_a, head_gate, state0, inits, first, seq)`` takes the
    padded ``[B, L, H, D]`` inputs and returns ``(out, entering, pseudo_values)``.
    """

    def unblock(x):
        return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], layout.padded_length) + x.shape[3:])

    def forward(q, k, v, beta, log_a, head_gate, state0, inits, first, seq):
        step = _block_step(_scalar_gate(kind, head_gate), layout, inits)
        xs = _block_inputs(layout, q, k, v, log_a, first, seq, beta)
        _, (out, entering, values) = jax.lax.scan(step, state0, xs)
        return unblock(out), entering, unblock(values)

    @jax.custom_vjp
    def core(q, k, v, beta, log_a, head_gate, state0, inits, first, seq):
        return forward(q, k, v, beta, log_a, head_gate, state0, inits, first, seq)

    def core_fwd(q, k, v, beta, log_a, head_gate, state0, inits, first, seq):
        outputs = forward(q, k, v, beta, log_a, head_gate, state0, inits, first, seq)
        _, entering, values = outputs
        return outputs, (q, k, v, beta, log_a, head_gate, state0, inits, first, seq,
                         entering, values)

    def core_bwd(residuals, cotangents):
        q, k, v, beta, log_a, head_gate, state0, inits, first, seq, entering, values = residuals
        d_out, d_entering, d_values = cotangents
        helpers = _backward_helpers(kind, layout, head_gate)
        step = make_delta_backward_step(kind, layout, helpers, num_sequences)
        q_b, k_b, v_b, log_a_b, first_b, seq_b, beta_b = _block_inputs(
            layout, q, k, v, log_a, first, seq, beta)
        xs = (q_b, k_b, v_b, beta_b, log_a_b, _blocks(values, layout), _blocks(d_out, layout),
              d_entering, _blocks(d_values, layout), entering, first_b, seq_b)
        carry = (jnp.zeros_like(state0), None if inits is None else jnp.zeros_like(inits),
                 None if kind != "head" else jnp.zeros_like(head_gate))
        (d_state0, d_inits, d_head), grads = jax.lax.scan(step, carry, xs, reverse=True)
        dq, dk, dv, d_beta, d_log_a = (None if x is None else unblock(x) for x in grads)
        return dq, dk, dv, d_beta, d_log_a, d_head, d_state0, d_inits, None, None

    core.defvjp(core_fwd, core_bwd)
    return core


def linear_attention_chunk(q: jax.Array, k: jax.Array, v: jax.Array, gate: LogGate,
                           initial_state: jax.Array | None, segments: Segments | None,
                           chunk_size: int,
                           beta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Chunked linear attention (or, with ``beta``, the delta rule); arguments and
    results as the recurrent form.

    Scalar gates (none, ``[H]``, ``[B, T, H]``) use hand-written backward passes
    (``chunk_backward.py`` for linear attention, ``delta_rule/chunk_backward.py`` for the
    delta rule); the per-channel gate is differentiated by JAX with each block
    rematerialised (its intra-chunk scores by their own VJP).
    """
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    layout = make_layout(batch, num_tokens, effective_chunk_size(chunk_size, num_tokens),
                         segments)
    q, k, v = (_pad(x, layout) for x in (q, k, v))
    log_a = None if gate.kind == "head" else _pad(gate.values, layout)
    packed = layout.dest is not None
    zeros = jnp.zeros((batch, heads, key_dim, value_dim), q.dtype)
    if packed:
        inits = (initial_state if initial_state is not None else
                 jnp.zeros((segments.num_sequences, heads, key_dim, value_dim), q.dtype))
        state0 = zeros
    else:
        inits, state0 = None, initial_state if initial_state is not None else zeros

    values = v
    if beta is not None and gate.kind != "channel":
        core = _delta_core(gate.kind, layout, segments.num_sequences if packed else None)
        out, entering, values = core(q, k, v, _pad(beta, layout), log_a,
                                     gate.values if gate.kind == "head" else None, state0,
                                     inits, layout.chunk_first, layout.chunk_seq)
    elif gate.kind == "channel" or beta is not None:
        xs = _block_inputs(layout, q, k, v, log_a, layout.chunk_first, layout.chunk_seq,
                           None if beta is None else _pad(beta, layout))
        # Rematerialise each block in the backward: saving every block's residuals
        # (scores, decays) costs more memory traffic than recomputing them in cache.
        step = jax.checkpoint(_block_step(gate, layout, inits))
        _, (out, entering, pseudo_values) = jax.lax.scan(step, state0, xs)
        unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, layout.padded_length, heads,
                                                          value_dim)
        out = unblock(out)
        values = v if pseudo_values is None else unblock(pseudo_values)
    else:
        core = _scalar_gate_core(gate.kind, layout,
                                 segments.num_sequences if packed else None)
        out, entering = core(q, k, v, log_a, gate.values if gate.kind == "head" else None,
                             state0, inits, layout.chunk_first, layout.chunk_seq,
                             layout.chunk_rank)
    out = out[:, :num_tokens] if not packed else out[:, layout.dest]
    finals = _final_states(entering, k, values, log_a, gate, layout, initial_state, segments)
    return out, finals
