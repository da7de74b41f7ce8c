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

The gate gradient is summed per chunk over the terms each gate sits in, so
nothing cancels (a strong decay leaves it accurate to float32 rounding of its own
size). With ``P_ij = (dO Vᵀ)_ij (Q Kᵀ ⊙ M)_ij`` the intra-chunk pair terms,
``dq_inter = e^b ⊙ (dO Sᵀ)`` and ``dk_inter = e^{b_C − b} ⊙ (V Gᵀ)``, the gate
of token ``t`` of the chunk gets::

    dg_t = Σ_{i ≥ t > j} P_ij + Σ_{i ≥ t} q_i·dq_inter_i + Σ_{j < t} k_j·dk_inter_j
           + e^{b_C} ⟨G, S⟩

(the outputs at and after ``t``, and the state leaving the chunk, through the
decays that hold ``g_t``); a per-head constant gate gets the sum over tokens.
The familiar ``Σ_{u ≥ t} (q_u·dq_u − k_u·dk_u)`` is the same sum with the
pairs at or after ``t`` added and cancelled again, which under strong decay
leaves nothing but their rounding. Exponents stay ≤ 0 throughout, as in the
forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_algebra import (
    chunk_log_decay,
    decay_state,
    expand,
    head_chunk_decay,
    scalar_decay_mask,
    scalar_gate_gradient,
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
        grad_state, d_inits, d_head = carry
        inputs, d_entering, entering = xs.inputs, xs.d_entering, xs.entering
        first, seq = inputs.first, inputs.seq
        qc, kc, vc, doc = (
            layout.head_major(x) for x in (inputs.q, inputs.k, inputs.v, xs.d_out)
        )  # [B, H, G, C, D]
        log_a = None if inputs.log_a is None else layout.head_major(inputs.log_a)
        b = chunk_log_decay(kind, head_gate, log_a, size)
        b_last = b.last(kind)
        e_b, e_to_end = jnp.exp(expand(b.value(), kind)), jnp.exp(expand(b.to_end, kind))
        mask = scalar_decay_mask(b, kind)  # [B|1, H, G|1, C, C]
        q_decayed = qc * e_b
        k_to_end = kc * e_to_end

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

        do_v = jnp.einsum("bhnid,bhnjd->bhnij", doc, vc)
        d_scores = do_v * mask
        scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * mask
        dq_inter = e_b * jnp.einsum("bhncv,bhnkv->bhnck", doc, entering)
        dk_inter = e_to_end * jnp.einsum("bhncv,bhnkv->bhnck", vc, grad_leaving)
        dq = jnp.einsum("bhnij,bhnjk->bhnik", d_scores, kc) + dq_inter
        dk = jnp.einsum("bhnij,bhnik->bhnjk", d_scores, qc) + dk_inter
        dv = jnp.einsum("bhnij,bhnic->bhnjc", scores, doc) + jnp.einsum(
            "bhnck,bhnkv->bhncv", k_to_end, grad_leaving
        )

        # Gate: the terms each g_t sits in (module docstring): per token [B, H, G, C],
        # or [H] for a head gate.
        end_decay = jnp.exp(b_last)  # [B, H, G, 1], or [H, 1] for a head gate
        end_decay = end_decay[None, :, None] if kind == "head" else end_decay
        leaving = end_decay[..., 0] * jnp.einsum("bhnkv,bhnkv->bhn", grad_leaving, entering)
        dg = scalar_gate_gradient(
            kind, do_v * scores, ((qc, dq_inter),), ((kc, dk_inter),), leaving
        )
        if kind == "head":
            assert d_head is not None  # zeros like the head gate
            d_head, d_log_a = d_head + dg, None
        else:
            d_log_a = token_major_rows(dg)

        return (
            BackwardCarry(grad_state, d_inits, d_head),
            BlockGrads(token_major(dq), token_major(dk), token_major(dv), None, d_log_a),
        )

    return step
