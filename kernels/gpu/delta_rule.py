"""The gated delta rule by the chunk-parallel GPU kernels, forward and backward.

    S' = e^{g_t} S_{t−1}
    S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ          o_t = scale · S_tᵀ q_t        (S: [K, V])

with no gate, ``g [H]`` or ``g [B, T, H]`` and ``β ∈ (0, 2)``. Inputs are padded
(``layout.py``; a padded token has ``k = v = 0``, ``g = 0``, ``β = 0``) and the gate
becomes the chunk-local cumulative log decay ``b`` in XLA. Per chunk (fla's
gated delta rule, WY/UT form)::

    w, u      = T diag(β)(K ⊙ e^{b}),  T diag(β) V,  T = (I + A)⁻¹       (wy.forward)
    v_n       = u − w h_n,  h_{n+1} = e^{b_last} h_n + (K ⊙ e^{b_last − b})ᵀ v_n   (delta_h.py)
    o         = scale [(Q ⊙ e^{b}) h_n + (Q Kᵀ ⊙ Γ) v_n]                   (chunk_o.output)

Backward (``jax.custom_vjp``; residuals: the padded inputs and ``T``)::

    recompute w, u (wy.recompute), h, v_n (delta_h.forward)
    dv_local = scale (Q Kᵀ ⊙ Γ)ᵀ dO                          (chunk_o.value_backward)
    dh, dv_n  by the reverse state recurrence                             (delta_h.backward)
    dq, dk, dw = −dv_n h_nᵀ, db                        (chunk_o.query_key_backward)
    dk, dv, dβ, db through w, u, T                                        (wy.backward)

XLA's autodiff of the padding, the broadcast of ``g [H]`` and the chunk cumsum turns
``db`` into ``dg`` (a reverse cumulative sum inside each chunk, summed over ``B, T``
for ``g [H]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import chunk_o, delta_h, layout, wy
from .layout import F32, Options


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    initial_state: jax.Array | None,
    *,
    scale: float,
    interpret: bool,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The chunked gated delta rule.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16).
      beta: ``[B, T, H]``, in ``(0, 2)``.
      g: log decay ``[H]`` or ``[B, T, H]``, or ``None`` (no gate).
      initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
      scale: the query scale.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      chunk_size: tokens per chunk (a multiple of 16).

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]``
      float32). Differentiable in ``q, k, v, beta, g`` and ``initial_state``.
    """
    batch, num_tokens, heads, key_dim = q.shape
    q_p, k_p, v_p, h0 = layout.pad_inputs(q, k, v, initial_state, chunk_size)
    length = q_p.shape[1]
    beta_p = layout.pad(beta.astype(F32), length)
    b = layout.chunk_gate(g, (batch, num_tokens, heads), length, chunk_size)
    options = Options(float(scale), chunk_size, bool(interpret))
    # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
    out, final = _delta(q_p, k_p, v_p, beta_p, b, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    return layout.unpad_outputs(out, final, num_tokens, key_dim, v.shape[-1])


def _forward(q, k, v, beta, b, h0, options: Options):
    size, interpret = options.chunk_size, options.interpret
    w, u, t = wy.forward(k, v, beta, b, chunk_size=size, interpret=interpret)
    h, v_new, final = delta_h.forward(k, w, u, b, h0, chunk_size=size, interpret=interpret)
    out = chunk_o.output(
        q, k, v_new, h, b, scale=options.scale, chunk_size=size, interpret=interpret
    )
    return out, final, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta(q, k, v, beta, b, h0, options: Options):
    """Padded ``(o, final)``: ``q, k [B, L, H, K]``, ``v [B, L, H, V]`` (one dtype),
    ``beta [B, L, H]`` float32, ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H]`` (or
    ``None``), ``h0 [B, H, K, V]`` float32."""
    out, final, _ = _forward(q, k, v, beta, b, h0, options)
    return out, final


def _delta_fwd(q, k, v, beta, b, h0, options: Options):
    out, final, t = _forward(q, k, v, beta, b, h0, options)
    return (out, final), (q, k, v, beta, b, h0, t)


def _delta_bwd(options: Options, residuals, cotangents):
    q, k, v, beta, b, h0, t = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(q.dtype)
    size, interpret, scale = options.chunk_size, options.interpret, options.scale
    w, u = wy.recompute(k, v, beta, b, t, chunk_size=size, interpret=interpret)
    h, v_new, _ = delta_h.forward(k, w, u, b, h0, chunk_size=size, interpret=interpret)
    dv_local = chunk_o.value_backward(
        q,
        k,
        d_out,
        None,
        b,
        scale=scale,
        chunk_size=size,
        interpret=interpret,
        name="delta_rule_output_bwd_dv",
    )
    dh, d_values, d_h0 = delta_h.backward(
        q,
        k,
        w,
        d_out,
        dv_local,
        b,
        d_final.astype(F32),
        scale=scale,
        chunk_size=size,
        interpret=interpret,
    )
    dq, dk_out, dw, db_out = chunk_o.query_key_backward(
        q,
        k,
        v_new,
        h,
        d_out,
        dh,
        b,
        dv=d_values,
        scale=scale,
        chunk_size=size,
        dk_dtype=F32,  # a partial sum, finished by wy.backward
        interpret=interpret,
        name="delta_rule_output_bwd_dqkw",
    )
    assert dw is not None  # given dv
    dk, dv, dbeta, db_wy = wy.backward(
        k, v, beta, b, t, dw, d_values, dk_out, chunk_size=size, interpret=interpret
    )
    db = None
    if b is not None:
        assert db_out is not None and db_wy is not None  # both given with a gate
        db = (db_out + db_wy, jnp.zeros_like(b[1]))  # the pair's lo moves with hi (gates.py)
    return dq, dk, dv, dbeta, db, d_h0


_delta.defvjp(_delta_fwd, _delta_bwd)
