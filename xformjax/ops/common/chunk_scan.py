"""The chunk engine: the blocked chunk scan both chunked families run.

A family is a :class:`ChunkRule`: what it precomputes for every chunk of a block
(batched), how the state entering a chunk turns that into the chunk's state
update, and its hand-written backward step. The engine owns everything else.

Inside chunk ``n`` let ``b_i = Σ_{s ≤ i} log a_s`` (cumulative log decay from the
chunk start, ≤ 0), ``S_n`` the state entering the chunk and ``U`` the chunk's
values (``V`` itself for linear attention, the delta rule's pseudo-values)::

    intra:  O_intra = (Q Kᵀ ⊙ exp(b_i − b_j) [j ≤ i]) U            (masked before exp)
    inter:  O_inter = (Q ⊙ exp(b)) S_n
    carry:  S_{n+1} = exp(b_C) ⊙ S_n + (K ⊙ exp(b_C − b))ᵀ U

Every exponent is ≤ 0, so nothing overflows however strong the gates are, and
``b`` is a compensated pair (:class:`.chunk_algebra.LogDecay`), so a strong gate
costs the weak ones beside it no precision.

Execution: an outer ``lax.scan`` walks over blocks of ``G`` chunks (about
``BLOCK_TOKENS`` tokens, :mod:`.chunk_layout`), carrying the K×V state. Each
step does the batched intra-chunk matmuls for its ``G`` chunks, an inner scan
over them for the states, and the inter-chunk outputs; every intermediate is
the size of one block, so it stays in cache and the time per token does not
depend on T.

Backward: for scalar gates (none, ``[H]``, ``[B, T, H]``) the rule's hand-written
backward step runs the mirror-image reverse scan, keeping only the inputs and
the state entering each chunk (and the delta rule's pseudo-values, an output
anyway), O(T·D + (T/C)·K·V): :func:`make_chunk_core` is the one ``custom_vjp``
scaffold. The per-channel gate is differentiated by JAX with each block
rematerialised, except for its intra-chunk scores, which carry their own VJP
(:mod:`.channel_scores`).

Final states are recomputed from the state entering each sequence's last chunk,
over its valid tokens only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_algebra import (
    LogDecay,
    chunk_decays,
    chunk_log_decay,
    decay_state,
    expand,
    gate_scores,
    head_chunk_decay,
    log_decays,
)
from xformjax.ops.common.chunk_layout import (
    ChunkLayout,
    effective_chunk_size,
    make_layout,
    token_major,
)
from xformjax.ops.common.gates import GateKind, LogGate
from xformjax.ops.common.validation import Segments


class ChunkTiles(NamedTuple):
    """One block of chunks, head-major, as a rule's ``prepare`` sees it.

    Attributes:
      q, k, v: ``[B, H, G, C, K|V]`` (``q`` already scaled).
      beta: ``[B, H, G, C, 1]`` delta-rule step sizes, or ``None``.
      b: the log decay from each chunk's start and to its end (layout in
        :mod:`.chunk_algebra`).
      decay_in: ``exp(b)`` broadcast to ``[B|1, H, G|1, C, K|1]``.
      k_to_end: ``K ⊙ exp(b_C − b)``, ``[B, H, G, C, K]``.
      kind: the gate's layout.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array | None
    b: LogDecay
    decay_in: jax.Array
    k_to_end: jax.Array
    kind: GateKind


class BlockInputs(NamedTuple):
    """The outer scan's ``xs``: token arrays ``[num_blocks, B, G·C, ...]`` and per-chunk
    flags ``[num_blocks, G]`` (any may be ``None``)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    log_a: jax.Array | None
    beta: jax.Array | None
    first: jax.Array | None
    seq: jax.Array | None
    rank: jax.Array | None


class ChunkInputs(NamedTuple):
    """What :func:`make_chunk_core` differentiates: the padded inputs of a chunked call.

    Attributes:
      q, k, v: padded ``[B, L, H, K|V]``.
      log_a: padded ``[B, L, H]`` token gate, or ``None`` (head gate).
      beta: padded ``[B, L, H]`` delta-rule step sizes, or ``None``.
      head_gate: ``[H]`` constant log decay for the head gate, else ``None``.
      state0: ``[B, H, K, V]`` state entering the first chunk.
      inits: ``[N, H, K, V]`` packed sequences' initial states, or ``None``.
      first, seq, rank: the layout's per-chunk flags (not differentiated).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    log_a: jax.Array | None
    beta: jax.Array | None
    head_gate: jax.Array | None
    state0: jax.Array
    inits: jax.Array | None
    first: jax.Array | None
    seq: jax.Array | None
    rank: jax.Array | None

    def blocked(self, layout: ChunkLayout) -> BlockInputs:
        blocks = lambda x: None if x is None else layout.blocks(x)
        return BlockInputs(
            layout.blocks(self.q),
            layout.blocks(self.k),
            layout.blocks(self.v),
            blocks(self.log_a),
            blocks(self.beta),
            layout.chunk_flags(self.first),
            layout.chunk_flags(self.seq),
            layout.chunk_flags(self.rank),
        )


class ChunkOutputs(NamedTuple):
    """Padded outputs ``[B, L, H, V]``, the state entering every chunk
    ``[num_blocks, B, H, G, K, V]``, and the pseudo-values ``[B, L, H, V]`` (delta rule;
    ``None`` for linear attention)."""

    out: jax.Array
    entering: jax.Array
    values: jax.Array | None


class BackwardCarry(NamedTuple):
    """The reverse scan's carry: the state cotangent, the packed initial states' and
    the head gate's cotangents."""

    grad_state: jax.Array
    d_inits: jax.Array | None
    d_head: jax.Array | None


class BackwardBlock(NamedTuple):
    """The reverse scan's ``xs`` for one block: its inputs, what the forward kept and
    the output cotangents (token arrays ``[B, G·C, H, ...]``; ``entering`` and
    ``d_entering`` ``[B, H, G, K, V]``)."""

    inputs: BlockInputs
    values: jax.Array | None
    entering: jax.Array
    d_out: jax.Array
    d_values: jax.Array | None
    d_entering: jax.Array


class BlockGrads(NamedTuple):
    """A backward step's per-block cotangents, token layout ``[B, G·C, H, ...]``."""

    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    d_beta: jax.Array | None
    d_log_a: jax.Array | None


BackwardStep = Callable[[BackwardCarry, BackwardBlock], tuple[BackwardCarry, BlockGrads]]


@dataclasses.dataclass(frozen=True)
class ChunkRule:
    """How one family updates the state, chunk by chunk.

    Attributes:
      name: for messages.
      prepare: ``ChunkTiles → tuple`` of per-chunk arrays ``[B, H, G, ...]``, batched
        over the block's chunks before the inner scan.
      transition: ``(S, prepared_n) → (update, values_n | None)``: the chunk's state
        update given the entering state ``S`` ``[B, H, K, V]``, and its pseudo-values
        ``[B, H, C, V]`` when they are not ``V``.
      make_backward_step: ``(kind, layout, head_gate, num_sequences) → BackwardStep``,
        the hand-written backward for scalar gates.
    """

    name: str
    prepare: Callable[[ChunkTiles], tuple[jax.Array, ...]]
    transition: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[jax.Array, jax.Array | None]]
    make_backward_step: Callable[
        [GateKind, ChunkLayout, jax.Array | None, int | None], BackwardStep
    ]


def make_block_step(
    rule: ChunkRule,
    kind: GateKind,
    head_gate: jax.Array | None,
    layout: ChunkLayout,
    inits: jax.Array | None,
):
    """The outer-scan body ``(state, BlockInputs) → (state, (out, entering, values))``:
    ``G`` chunks given the state entering the first."""
    head_decay = head_chunk_decay(head_gate, layout.chunk_size)

    def step(state, xs: BlockInputs):
        qc, kc, vc = (layout.head_major(x) for x in (xs.q, xs.k, xs.v))  # [B, H, G, C, D]
        log_a = None if xs.log_a is None else layout.head_major(xs.log_a)
        b = chunk_log_decay(kind, head_gate, log_a, layout.chunk_size)
        decay_in = jnp.exp(expand(b.value(), kind))
        k_to_end = kc * jnp.exp(expand(b.to_end, kind))
        beta = None if xs.beta is None else layout.head_major(xs.beta)[..., None]
        tiles = ChunkTiles(qc, kc, vc, beta, b, decay_in, k_to_end, kind)
        scores = gate_scores(qc, kc, b, kind)
        prepared = rule.prepare(tiles)

        def inner(carry, xs_n):
            prepared_n, decay, first_n, seq_n = xs_n
            if inits is not None:
                carry = jnp.where(first_n, inits[seq_n][None], carry)
            update, values = rule.transition(carry, prepared_n)
            decay = head_decay if kind == "head" else decay
            assert decay is not None  # a head gate has head_decay, other kinds chunk_decays
            return decay_state(carry, kind, decay) + update, (carry, values)

        state, (entering, values) = jax.lax.scan(
            inner,
            state,
            (
                tuple(jnp.moveaxis(x, 2, 0) for x in prepared),
                chunk_decays(b, kind),
                xs.first,
                xs.seq,
            ),
        )
        entering = jnp.moveaxis(entering, 0, 2)  # [B, H, G, K, V]
        pseudo = values is not None
        values = jnp.moveaxis(values, 0, 2) if pseudo else vc
        out = jnp.einsum("bhnij,bhnjv->bhniv", scores, values) + jnp.einsum(
            "bhnck,bhnkv->bhncv", qc * decay_in, entering
        )
        return state, (token_major(out), entering, token_major(values) if pseudo else None)

    return step


def scan_blocks(
    rule: ChunkRule,
    layout: ChunkLayout,
    inputs: ChunkInputs,
    kind: GateKind,
    *,
    remat: bool = False,
) -> ChunkOutputs:
    """The forward: the outer scan over blocks, unblocked to padded token layout.

    ``remat`` rematerialises each block in JAX's backward (the per-channel gate):
    saving every block's residuals (scores, decays) costs more memory traffic
    than recomputing them in cache.
    """
    step = make_block_step(rule, kind, inputs.head_gate, layout, inputs.inits)
    if remat:
        step = jax.checkpoint(step)
    _, (out, entering, values) = jax.lax.scan(step, inputs.state0, inputs.blocked(layout))
    return ChunkOutputs(
        layout.unblock(out), entering, None if values is None else layout.unblock(values)
    )


def make_chunk_core(
    rule: ChunkRule, kind: GateKind, layout: ChunkLayout, num_sequences: int | None
) -> Callable[[ChunkInputs], ChunkOutputs]:
    """:func:`scan_blocks` with the rule's hand-written backward (scalar gates).

    Residuals: the inputs, the entering states and the pseudo-values. The backward
    runs ``rule.make_backward_step(...)`` as a reverse scan over blocks.
    """
    if kind == "channel":
        raise ValueError(f"{rule.name}: the hand-written backward covers scalar gates only")

    @jax.custom_vjp
    def core(inputs: ChunkInputs) -> ChunkOutputs:
        return scan_blocks(rule, layout, inputs, kind)

    def core_fwd(inputs: ChunkInputs):
        outputs = scan_blocks(rule, layout, inputs, kind)
        return outputs, (inputs, outputs.entering, outputs.values)

    def core_bwd(residuals, cotangents: ChunkOutputs):
        inputs, entering, values = residuals
        step = rule.make_backward_step(kind, layout, inputs.head_gate, num_sequences)
        blocks = lambda x: None if x is None else layout.blocks(x)
        xs = BackwardBlock(
            inputs.blocked(layout),
            blocks(values),
            entering,
            layout.blocks(cotangents.out),
            blocks(cotangents.values),
            cotangents.entering,
        )
        state0, zeros = inputs.state0, lambda x: None if x is None else jnp.zeros_like(x)
        carry = BackwardCarry(
            jnp.zeros_like(state0),
            zeros(inputs.inits),
            zeros(inputs.head_gate),
        )
        carry, grads = jax.lax.scan(step, carry, xs, reverse=True)
        unblock = lambda x: None if x is None else layout.unblock(x)
        return (
            ChunkInputs(
                layout.unblock(grads.dq),
                layout.unblock(grads.dk),
                layout.unblock(grads.dv),
                unblock(grads.d_log_a),
                unblock(grads.d_beta),
                carry.d_head,
                carry.grad_state,
                carry.d_inits,
                None,
                None,
                None,
            ),
        )

    core.defvjp(core_fwd, core_bwd)
    return core


def final_states(
    entering: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_a: jax.Array | None,
    gate: LogGate,
    layout: ChunkLayout,
    initial_state: jax.Array | None,
    segments: Segments | None,
) -> jax.Array:
    """Each sequence's state after its last valid token, ``[N, H, K, V]``.

    ``entering`` is ``[num_blocks, B, H, G, K, V]``; ``k``, ``v`` (the values the
    state accumulates), ``log_a`` are the padded ``[B, L, H, ...]`` inputs.
    """
    rows, chunks, lengths = layout.final_rows, layout.final_chunks, layout.final_lengths
    size = layout.chunk_size
    per_block = layout.chunks_per_block
    state = entering[chunks // per_block, rows, :, chunks % per_block]  # [N, H, K, V]
    token_index = chunks[:, None] * size + jnp.arange(size)  # [N, C]
    gather = lambda x: jnp.moveaxis(x[rows[:, None], token_index], 1, 2)  # [N, H, C, ...]
    k_last, v_last = gather(k), gather(v)
    valid = jnp.arange(size)[None, :] < lengths[:, None]  # [N, C]
    if gate.kind == "head":
        steps = jnp.where(valid[:, None], gate.values[None, :, None], 0.0)  # [N, H, C]
    else:
        assert log_a is not None
        # Gates past a sequence's end are 0 in the padded layout; masked all the same.
        mask = valid[:, None] if gate.kind == "token" else valid[:, None, :, None]
        steps = jnp.where(mask, gather(log_a), 0.0)  # [N, H, C] or [N, H, C, K]
    # From each valid token to the sequence's end, and the whole valid stretch
    # (padding adds 0): its VJP sums the terms each gate is in, no cancellation.
    b = log_decays(steps, 2)
    b_end = b.value()[:, :, -1]  # [N, H] or [N, H, K]
    if gate.kind == "channel":
        log_to_end = jnp.where(valid[:, None, :, None], b.to_end, -jnp.inf)
        state_decay = jnp.exp(b_end)[..., None]
    else:
        log_to_end = jnp.where(valid[:, None], b.to_end, -jnp.inf)[..., None]
        state_decay = jnp.exp(b_end)[..., None, None]
    finals = state_decay * state + jnp.einsum(
        "nhck,nhcv->nhkv", k_last * jnp.exp(log_to_end), v_last
    )
    if segments is not None:
        before = initial_state if initial_state is not None else jnp.zeros_like(finals)
        finals = jnp.where((segments.lengths == 0)[:, None, None, None], before, finals)
    return finals


def chunk_scan(
    rule: ChunkRule,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
    chunk_size: int,
    beta: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run ``rule`` over a sequence in chunks; arguments and results as the recurrent form.

    Args:
      q, k: ``[B, T, H, K]`` (``q`` already scaled); v: ``[B, T, H, V]``.
      gate: the log decay (:class:`.gates.LogGate`).
      initial_state: ``[N, H, K, V]`` or ``None``; segments: the packing, or ``None``.
      chunk_size: ``C`` (shortened for short sequences, see ``effective_chunk_size``).
      beta: ``[B, T, H]`` step sizes for a rule that takes them (the delta rule).

    Returns:
      ``o [B, T, H, V]`` and the final states ``[N, H, K, V]``.
    """
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    layout = make_layout(batch, num_tokens, effective_chunk_size(chunk_size, num_tokens), segments)
    q, k, v = (layout.pad(x) for x in (q, k, v))
    log_a = None if gate.kind == "head" else layout.pad(gate.values)
    zeros = jnp.zeros((batch, heads, key_dim, value_dim), q.dtype)
    if segments is not None:
        inits = (
            initial_state
            if initial_state is not None
            else jnp.zeros((segments.num_sequences, heads, key_dim, value_dim), q.dtype)
        )
        state0 = zeros
    else:
        inits, state0 = None, initial_state if initial_state is not None else zeros
    inputs = ChunkInputs(
        q,
        k,
        v,
        log_a,
        None if beta is None else layout.pad(beta),
        gate.values if gate.kind == "head" else None,
        state0,
        inits,
        layout.chunk_first,
        layout.chunk_seq,
        layout.chunk_rank if gate.kind == "head" else None,
    )
    if gate.kind == "channel":
        outputs = scan_blocks(rule, layout, inputs, gate.kind, remat=True)
    else:
        core = make_chunk_core(
            rule, gate.kind, layout, None if segments is None else segments.num_sequences
        )
        outputs = core(inputs)
    values = v if outputs.values is None else outputs.values
    finals = final_states(outputs.entering, k, values, log_a, gate, layout, initial_state, segments)
    return layout.unpad(outputs.out, num_tokens), finals
