"""Hand-written backward of the chunked delta rule for scalar gates (none, ``[H]``, ``[B, T, H]``).

The forward (``chunk.py``: the WY/UT rule in the engine of
``xformjax.ops.common.chunk_scan``) returns the outputs, the
state entering every chunk and the pseudo-values ``U``; besides the inputs, the
entering states and ``U`` (an output already) are the only residuals. Per chunk,
with ``b`` the log decay accumulated from the chunk start,
``Γ_ij = e^{b_i − b_j}[j ≤ i]``, ``S`` the entering state, ``G`` the cotangent of
the state leaving the chunk::

    forward:  A = tril(diag(β)(K Kᵀ ⊙ Γ), −1),  T = (I + A)⁻¹
              X = diag(β)(K ⊙ e^b),  Y = diag(β) V,  W = T X,  U = T Y − W S
              O = (Q Kᵀ ⊙ Γ) U + (Q ⊙ e^b) S,  S' = e^{b_C} S + (K ⊙ e^{b_C − b})ᵀ U
    backward: dU = (Q Kᵀ ⊙ Γ)ᵀ dO + (K ⊙ e^{b_C − b}) G (+ dU from outside)
              G_in = (Q ⊙ e^b)ᵀ dO + e^{b_C} G − Wᵀ dU (+ dS from outside)
              dY = Tᵀ dU,  dX = −dY Sᵀ,  dA = −tril(dY Uᵀ, −1)

The last line is the chain rule through ``T``, ``W`` and ``U`` collapsed: with
``dW = −dU Sᵀ`` and ``dT = dW Xᵀ + dU Yᵀ``, ``dX = Tᵀ dW = −dY Sᵀ`` and
``Tᵀ dT Tᵀ = dX (T X)ᵀ + dY (T Y)ᵀ = dY (T Y − W S)ᵀ = dY Uᵀ``, so
``dA = −tril(Tᵀ dT Tᵀ, −1)`` needs one matmul and no ``C×C×C`` products.

``G`` runs backwards over a block's chunks in a small scan (restarting at
packed sequence boundaries, where it becomes the initial state's cotangent);
everything else is batched over the chunks, and from ``dX, dY, dA`` follow
``dq, dk, dv, dβ``. The gates enter only through decays inside a chunk, and
the gate of token ``t`` collects the terms whose decay holds it, summed
directly so that nothing cancels (under strong decay the cancelling form
``Σ_{u ≥ t} ∂L/∂b_u`` leaves only rounding): with the pair terms
``P_ij = (dO Uᵀ)_ij (Q Kᵀ ⊙ Γ)_ij + dA_ij β_i Γ_ij k_i·k_j``::

    dg_t = Σ_{i ≥ t > j} P_ij + Σ_{i ≥ t} (q_i·dq_inter_i + β_i e^{b_i} dX_i·k_i)
           + Σ_{j < t} k_j·dk_to_end_j + e^{b_C} ⟨G, S⟩

(``e^b`` factors hold the gates up to their row, ``e^{b_C − b}`` those after
it); a per-head constant gate gets the sum over tokens. The same per-chunk algebra is
what the Pallas kernel runs (``xformjax.kernels.chunk_math.scalar_backward``,
written for one chunk's 2-D tiles inside the kernel body).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_algebra import (
    chunk_log_decay,
    expand,
    row_dot,
    scalar_decay_mask,
    scalar_gate_gradient,
)
from xformjax.ops.common.chunk_layout import ChunkLayout, token_major, token_major_rows
from xformjax.ops.common.chunk_scan import BackwardBlock, BackwardCarry, BackwardStep, BlockGrads
from xformjax.ops.common.gates import GateKind
from xformjax.ops.delta_rule.inverse import unit_lower_inverse


def make_backward_step(
    kind: GateKind, layout: ChunkLayout, head_gate: jax.Array | None, num_sequences: int | None
) -> BackwardStep:
    """The reverse-scan body over blocks for the delta rule (scalar gates)."""
    packed = num_sequences is not None
    size = layout.chunk_size
    strictly = jnp.tril(jnp.ones((size, size), bool), -1)
    mm = jnp.einsum

    def step(carry: BackwardCarry, xs: BackwardBlock) -> tuple[BackwardCarry, BlockGrads]:
        grad_state, d_inits, d_head = carry
        inputs, d_entering, entering = xs.inputs, xs.d_entering, xs.entering
        first, seq = inputs.first, inputs.seq
        assert inputs.beta is not None and xs.values is not None and xs.d_values is not None
        qc, kc, vc, uc, doc, d_values_c = (
            layout.head_major(x)
            for x in (inputs.q, inputs.k, inputs.v, xs.values, xs.d_out, xs.d_values)
        )  # [B, H, G, C, D]
        betac = layout.head_major(inputs.beta[..., None])  # [B, H, G, C, 1]
        log_a = None if inputs.log_a is None else layout.head_major(inputs.log_a)
        b = chunk_log_decay(kind, head_gate, log_a, size)
        b_last = b.last(kind)
        e_b, e_to_end = jnp.exp(expand(b.value(), kind)), jnp.exp(expand(b.to_end, kind))
        gamma = scalar_decay_mask(b, kind)  # [B|1, H, G|1, C, C]
        gamma_strict = jnp.where(strictly, gamma, 0.0)

        kk = mm("bhnik,bhnjk->bhnij", kc, kc)
        scores = mm("bhnik,bhnjk->bhnij", qc, kc) * gamma
        transform = unit_lower_inverse(kk * gamma_strict * betac)
        w = mm("bhnij,bhnjk->bhnik", transform, betac * kc * e_b)
        k_to_end = kc * e_to_end

        # State cotangents, chunk by chunk from the last.
        base_d_values = mm("bhnij,bhniv->bhnjv", scores, doc) + d_values_c
        from_outputs = mm("bhnck,bhncv->bhnkv", qc * e_b, doc) + d_entering
        decay = jnp.exp(b_last[..., 0])
        decay = (
            jnp.broadcast_to(decay[None, :, None], entering.shape[:3]) if kind == "head" else decay
        )  # [B, H, G]

        def inner(grad_out, xs_n):
            base_n, outputs_n, k_end_n, w_n, decay_n, first_n = xs_n
            d_values_n = base_n + mm("bhck,bhkv->bhcv", k_end_n, grad_out)
            grad_in = (
                outputs_n
                + decay_n[..., None, None] * grad_out
                - mm("bhck,bhcv->bhkv", w_n, d_values_n)
            )
            grad_prev = grad_in if first_n is None else jnp.where(first_n, 0.0, grad_in)
            return grad_prev, (grad_out, grad_in, d_values_n)

        chunk_major = lambda a: jnp.moveaxis(a, 2, 0)
        grad_state, (grad_leaving, grad_entering, d_vals) = jax.lax.scan(
            inner,
            grad_state,
            (
                chunk_major(base_d_values),
                chunk_major(from_outputs),
                chunk_major(k_to_end),
                chunk_major(w),
                chunk_major(decay),
                first,
            ),
            reverse=True,
        )
        grad_leaving, d_vals = (jnp.moveaxis(a, 0, 2) for a in (grad_leaving, d_vals))
        if packed:
            assert first is not None and d_inits is not None  # packed: the layout's flags, inits
            starts = jnp.where(first[:, None, None, None], grad_entering[:, 0], 0.0)
            d_inits = d_inits.at[seq].add(starts)

        do_u = mm("bhniv,bhnjv->bhnij", doc, uc)
        d_scores = do_u * gamma
        dq_inter = mm("bhncv,bhnkv->bhnck", doc, entering) * e_b
        dq = mm("bhnij,bhnjk->bhnik", d_scores, kc) + dq_inter
        dk_scores = mm("bhnij,bhnik->bhnjk", d_scores, qc)
        dk_to_end = mm("bhncv,bhnkv->bhnck", uc, grad_leaving) * e_to_end
        dy = mm("bhnji,bhnjv->bhniv", transform, d_vals)  # Tᵀ dU
        dx = -mm("bhncv,bhnkv->bhnck", dy, entering)  # −dY Sᵀ
        da = jnp.where(strictly, -mm("bhniv,bhnjv->bhnij", dy, uc), 0.0)  # −tril(dY Uᵀ)
        da_kk = da * betac * gamma_strict
        # A_ij ∝ k_i·k_j: row i gets Σ_j dA_ij k_j, row j gets Σ_i dA_ij k_i, in one matmul
        dk_pairs = mm("bhnij,bhnjk->bhnik", da_kk + jnp.swapaxes(da_kk, -1, -2), kc)
        dk_x = dx * betac * e_b
        dv = dy * betac
        dk = dk_scores + dk_to_end + dk_pairs + dk_x

        # Row sums as dot_generals (``row_dot``), not jnp.sum of products: see there.
        # Σ_j dA_ij Γ_ij k_i·k_j per row i
        pair_rows = jnp.einsum("...ij,...ij->...i", da * gamma_strict, kk)
        x_rows = row_dot(dx * e_b, kc)  # Σ_k dX_ik e^{b_i} k_ik
        dbeta = pair_rows + x_rows + row_dot(dy, vc)  # [B, H, G, C]

        # Gate: the terms each g_t sits in (module docstring): per token [B, H, G, C],
        # or [H] for a head gate.
        leaving = decay * jnp.einsum("bhnkv,bhnkv->bhn", grad_leaving, entering)
        dg = scalar_gate_gradient(
            kind,
            do_u * scores + da_kk * kk,
            ((qc, dq_inter), (kc, dk_x)),
            ((kc, dk_to_end),),
            leaving,
        )
        if kind == "head":
            assert d_head is not None  # zeros like the head gate
            d_head, d_log_a = d_head + dg, None
        else:
            d_log_a = token_major_rows(dg)

        return (
            BackwardCarry(grad_state, d_inits, d_head),
            BlockGrads(
                token_major(dq), token_major(dk), token_major(dv), token_major_rows(dbeta), d_log_a
            ),
        )

    return step
