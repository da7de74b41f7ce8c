"""Hand-written backward of the chunked form for scalar gates (none, ``[H]``, ``[B, T, H]``).

The forward (``chunk.py``) returns the outputs and the state entering every
chunk; those states are the only residual besides the inputs. Per chunk, with
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

from xformjax.ops.common.gates import reverse_cumulative_sum


def row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Σ_d a[..., d]·b[..., d]`` (broadcasting the leading axes), as a ``dot_general``.

    Not ``jnp.sum(a * b, axis=-1)``: XLA:CPU (jaxlib 0.10) hands a fused
    multiply-then-reduce to YNNPACK, which ran it 7× slower than this dot on
    ``[4, 8, 64, 64]`` rows (300 µs against 45 µs); in the delta rule's
    backward three such sums took a fifth of the time.
    """
    return jnp.einsum("...d,...d->...", a, b)


def make_backward_step(kind: str, layout, helpers, head_gate: jax.Array | None,
                       num_sequences: int | None):
    """Outer reverse-scan body over blocks. ``helpers`` gives chunk.py's layout and
    decay functions: ``head_major``, ``cumulative``, ``expand``, ``decay_mask`` and
    ``decay_state``."""
    packed = num_sequences is not None
    size = layout.chunk_size

    def step(carry, xs):
        grad_state, suffix, d_inits, d_head = carry
        q, k, v, log_a, d_out, d_entering, entering, first, seq, rank = xs
        qc, kc, vc, doc = (helpers.head_major(x) for x in (q, k, v, d_out))  # [B, H, G, C, D]
        b = helpers.cumulative(None if log_a is None else helpers.head_major(log_a))
        b_last = b[..., -1:]
        b_full, b_last_full = helpers.expand(b), helpers.expand(b_last)
        mask = helpers.decay_mask(b)  # [B|1, H, G|1, C, C]
        q_decayed = qc * jnp.exp(b_full)
        k_to_end = kc * jnp.exp(b_last_full - b_full)

        # State cotangents, chunk by chunk from the last.
        from_outputs = jnp.einsum("bhnck,bhncv->bhnkv", q_decayed, doc) + d_entering
        head_decay = jnp.exp(head_gate * size) if kind == "head" else None
        per_chunk_decay = None if kind == "head" else jnp.moveaxis(jnp.exp(b_last[..., 0]), 2, 0)

        def inner(grad_out, xs_n):
            contribution, decay, first_n = xs_n
            grad_in = helpers.decay_state(grad_out, head_decay if kind == "head" else decay)
            grad_in = grad_in + contribution
            grad_prev = grad_in if first_n is None else jnp.where(first_n, 0.0, grad_in)
            return grad_prev, (grad_out, grad_in)

        grad_state, (grad_leaving, grad_entering) = jax.lax.scan(
            inner, grad_state, (jnp.moveaxis(from_outputs, 2, 0), per_chunk_decay, first),
            reverse=True)
        grad_leaving = jnp.moveaxis(grad_leaving, 0, 2)  # [B, H, G, K, V]
        if packed:
            starts = jnp.where(first[:, None, None, None], grad_entering[:, 0], 0.0)
            d_inits = d_inits.at[seq].add(starts)

        d_scores = jnp.einsum("bhnid,bhnjd->bhnij", doc, vc) * mask
        scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * mask
        dq = (jnp.einsum("bhnij,bhnjk->bhnik", d_scores, kc)
              + jnp.exp(b_full) * jnp.einsum("bhncv,bhnkv->bhnck", doc, entering))
        dk = (jnp.einsum("bhnij,bhnik->bhnjk", d_scores, qc)
              + jnp.exp(b_last_full - b_full) * jnp.einsum("bhncv,bhnkv->bhnck", vc, grad_leaving))
        dv = (jnp.einsum("bhnij,bhnic->bhnjc", scores, doc)
              + jnp.einsum("bhnck,bhnkv->bhncv", k_to_end, grad_leaving))

        # Gate: ∂L/∂B per token, plus ⟨dS, S⟩ for each emitted entering state,
        # which sits at the last token of the previous chunk (none at a restart).
        state_term = jnp.sum(d_entering * entering, axis=(-2, -1))  # [B, H, G]
        if first is not None:
            state_term = jnp.where(first, 0.0, state_term)
        if kind == "head":
            positions = (rank[:, None] * size + jnp.arange(1, size + 1)).astype(qc.dtype)
            d_head = d_head + (jnp.einsum("bhnck,bhnck,nc->h", qc, dq, positions)
                               - jnp.einsum("bhnck,bhnck,nc->h", kc, dk, positions)
                               + jnp.einsum("bhn,n->h", state_term, rank.astype(qc.dtype) * size))
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
                suffix_step, suffix,
                (jnp.moveaxis(within[..., 0], 2, 0), jnp.moveaxis(state_term, 2, 0), first),
                reverse=True)
            d_log_a = within + jnp.moveaxis(after, 0, 2)[..., None]
            d_log_a = jnp.moveaxis(d_log_a, 1, 3).reshape(d_log_a.shape[0], -1, d_log_a.shape[1])

        flat = lambda x: jnp.moveaxis(x, 1, 3).reshape(x.shape[0], -1, x.shape[1], x.shape[-1])
        return (grad_state, suffix, d_inits, d_head), (flat(dq), flat(dk), flat(dv), d_log_a)

    return step
