"""Hand-written backward of chunked linear attention, scalar gates (none, [H], [B, T, H]).

The forward (``chunk.py``, run by ``xformjax.ops.common.chunk_scan``) returns the
outputs and the state entering every chunk; those states are the only residual
besides the inputs. Per chunk, with
``M_ij = exp(b_i − b_j)[j ≤ i]``, ``S`` the entering state, ``G`` the cotangent
of the state leaving the chunk and ``dO`` the output cotangent::

    G_in = exp(b_C)·G + (Q ⊙ e^b)ᵀ dO (+ the cotangent of S itself, an output)
    dQ   = (dO Vᵀ ⊙ M) K + e^b ⊙ (dO Sᵀ)
    dK   = (dO Vᵀ ⊙ M)ᵀ Q + e^{b_C − b} ⊙ (V Gᵀ)
    dV   = (Q Kᵀ ⊙ M)ᵀ dO + (K ⊙ e^{b_C − b}) G

``G`` runs backwards over chunks (``lax.scan(reverse=True)`` over blocks, a small
inner scan over a block's chunks), restarting at packed sequence boundaries,
where it becomes the initial state's gradient.

The gate gradient needs no extra matmul. With ``B_t`` the log decay accumulated
from the sequence start, every term depends on the gates only through
``q_t e^{B_t}``, ``k_t e^{−B_t}`` and ``e^{B_p}`` for each emitted state at the
end ``p`` of a chunk, so

    ∂L/∂B_t = q_t·dq_t − k_t·dk_t + [t = p] ⟨dS_p, S_p⟩
    dg_t    = Σ_{u ≥ t, same sequence} ∂L/∂B_u

and a per-head constant gate gets ``Σ_t (t − start + 1)·∂L/∂B_t``. Exponents
stay ≤ 0 throughout, as in the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_algebra import (
    chunk_log_decay,
    decay_state,
    expand,
    head_chunk_decay,
    reverse_cumulative_sum,
    row_dot,
    scalar_decay_mask,
)
from xformjax.ops.common.chunk_layout import ChunkLayout, token_major, token_major_rows
from xformjax.ops.common.chunk_scan import BackwardBlock, BackwardCarry, BackwardStep, BlockGrads
from xformjax.ops.common.gates import GateKind


def make_backward_step(
    kind: GateKind, layout: ChunkLayout, head_gate: jax.Array | None, num_sequences: int | None
) -> BackwardStep:
    """The reverse-scan body over blocks for linear attention (scalar gates)."""
    packed = num_sequences is not None
    size = layout.chunk_size

    def step(carry: BackwardCarry, xs: BackwardBlock) -> tuple[BackwardCarry, BlockGrads]:
        grad_state, suffix, d_inits, d_head = carry
        inputs, d_entering, entering = xs.inputs, xs.d_entering, xs.entering
        first, seq, rank = inputs.first, inputs.seq, inputs.rank
        qc, kc, vc, doc = (
            layout.head_major(x) for x in (inputs.q, inputs.k, inputs.v, xs.d_out)
        )  # [B, H, G, C, D]
        log_a = None if inputs.log_a is None else layout.head_major(inputs.log_a)
        b = chunk_log_decay(kind, head_gate, log_a, size)
        b_last = b[..., -1:]
        b_full, b_last_full = expand(b, kind), expand(b_last, kind)
        mask = scalar_decay_mask(b, kind)  # [B|1, H, G|1, C, C]
        q_decayed = qc * jnp.exp(b_full)
        k_to_end = kc * jnp.exp(b_last_full - b_full)

        # State cotangents, chunk by chunk from the last.
        from_outputs = jnp.einsum("bhnck,bhncv->bhnkv", q_decayed, doc) + d_entering
        head_decay = head_chunk_decay(head_gate, size)
        per_chunk_decay = None if kind == "head" else jnp.moveaxis(jnp.exp(b_last[..., 0]), 2, 0)

        def inner(grad_out, xs_n):
            contribution, decay, first_n = xs_n
            step_decay = head_decay if kind == "head" else decay
            assert step_decay is not None  # a head gate has head_decay, a token gate its own
            grad_in = decay_state(grad_out, kind, step_decay)
            grad_in = grad_in + contribution
            grad_prev = grad_in if first_n is None else jnp.where(first_n, 0.0, grad_in)
            return grad_prev, (grad_out, grad_in)

        grad_state, (grad_leaving, grad_entering) = jax.lax.scan(
            inner,
            grad_state,
            (jnp.moveaxis(from_outputs, 2, 0), per_chunk_decay, first),
            reverse=True,
        )
        grad_leaving = jnp.moveaxis(grad_leaving, 0, 2)  # [B, H, G, K, V]
        if packed:
            assert first is not None and d_inits is not None  # packed: the layout's flags, inits
            starts = jnp.where(first[:, None, None, None], grad_entering[:, 0], 0.0)
            d_inits = d_inits.at[seq].add(starts)

        d_scores = jnp.einsum("bhnid,bhnjd->bhnij", doc, vc) * mask
        scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * mask
        dq = jnp.einsum("bhnij,bhnjk->bhnik", d_scores, kc) + jnp.exp(b_full) * jnp.einsum(
            "bhncv,bhnkv->bhnck", doc, entering
        )
        dk = jnp.einsum("bhnij,bhnik->bhnjk", d_scores, qc) + jnp.exp(
            b_last_full - b_full
        ) * jnp.einsum("bhncv,bhnkv->bhnck", vc, grad_leaving)
        dv = jnp.einsum("bhnij,bhnic->bhnjc", scores, doc) + jnp.einsum(
            "bhnck,bhnkv->bhncv", k_to_end, grad_leaving
        )

        # Gate: ∂L/∂B per token, plus ⟨dS, S⟩ for each emitted entering state,
        # which sits at the last token of the previous chunk (none at a restart).
        state_term = jnp.sum(d_entering * entering, axis=(-2, -1))  # [B, H, G]
        if first is not None:
            state_term = jnp.where(first, 0.0, state_term)
        if kind == "head":
            assert rank is not None and d_head is not None  # a head gate's rank, cotangent
            positions = (rank[:, None] * size + jnp.arange(1, size + 1)).astype(qc.dtype)
            d_head = d_head + (
                jnp.einsum("bhnck,bhnck,nc->h", qc, dq, positions)
                - jnp.einsum("bhnck,bhnck,nc->h", kc, dk, positions)
                + jnp.einsum("bhn,n->h", state_term, rank.astype(qc.dtype) * size)
            )
            d_log_a = None
        else:
            d_log_b = row_dot(qc, dq) - row_dot(kc, dk)  # [B, H, G, C]
            within = reverse_cumulative_sum(d_log_b, axis=-1)

            def suffix_step(after, xs_n):
                total, extra, first_n = xs_n
                before = total + after + extra
                before = before if first_n is None else jnp.where(first_n, 0.0, before)
                return before, after

            suffix, after = jax.lax.scan(
                suffix_step,
                suffix,
                (jnp.moveaxis(within[..., 0], 2, 0), jnp.moveaxis(state_term, 2, 0), first),
                reverse=True,
            )
            d_log_a = token_major_rows(within + jnp.moveaxis(after, 0, 2)[..., None])

        return (
            BackwardCarry(grad_state, suffix, d_inits, d_head),
            BlockGrads(token_major(dq), token_major(dk), token_major(dv), None, d_log_a),
        )

    return step
