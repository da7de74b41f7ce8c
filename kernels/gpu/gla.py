"""Chunk-parallel gated linear attention (GLA, per-key-channel gate) for GPUs, with backward.

    S_t = diag(e^{gk_t + g_t}) S_{t−1} + k_t v_tᵀ        o_t = scale · S_tᵀ q_t     S: [K, V]

(``g``, a scalar log decay per token or per head, is folded into every channel).
flash-linear-attention's ``chunk_gla`` decomposition, in chunks of ``C = 64``
tokens with ``b`` the chunk-local cumulative log decay ``[C, K]``::

    O       = scale · (Q ⊙ e^{b}) h_n + A V,     A_ij = scale Σ_c q_ic k_jc e^{b_ic − b_jc} [j ≤ i]
    h_{n+1} = diag(e^{b_last}) h_n + (K ⊙ e^{b_last − b})ᵀ V

Forward kernels: the state recurrence (``gla_state``, the only sequential one),
the intra-chunk scores ``A`` by 16-row sub-chunks (``gla_intra``) and the output
(``gla_output``). Saved for the backward: the inputs, ``b`` (float32, the compensated
pair ``(hi, lo)`` of ``kernels/gates.py``; ``dv`` reads ``b_last − b`` formed from it in
XLA, ``layout.to_chunk_end``), the
chunk-entering states ``h [B, N, H, K, V]`` (input dtype) and ``A [B, L, H, C]``
(float32). Backward: the reverse state recurrence for the cotangents ``dh`` of the
chunk-leaving states (``gla_state``, input dtype), ``dA`` and ``dv``
(``gla_output``), the intra-chunk ``dq, dk`` by sub-chunks (``gla_intra``), then
the inter-chunk parts and the gradient of the per-token log decays — its reverse
chunk-local cumulative sum taken inside the kernel, without cancellation
(``gla_inter``). Padding, folding ``g`` into ``gk`` and the chunk-local cumulative
sum ``b`` are XLA, which differentiates the first two (``dg`` is the sum of ``dgk``
over channels).

Why ``C = 64`` with 16-row sub-chunks: fla's choice. The state kernels' work and
the ``h``/``dh`` memory scale with ``1/C``; the masked per-column loop of the
diagonal sub-blocks scales with the sub-chunk (16 rows, the smallest ``dot`` tile).
"""

from __future__ import annotations

import functools

import jax

from . import layout
from .gla_common import F32, TILES, GLATiles
from .gla_inter import inter_grads
from .gla_intra import intra_grads, intra_scores
from .gla_output import d_scores, output, value_grads
from .gla_state import state_backward, state_forward
from .layout import Options


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    g: jax.Array | None,
    initial_state: jax.Array | None,
    *,
    scale: float,
    interpret: bool,
    tiles: GLATiles = TILES,
) -> tuple[jax.Array, jax.Array]:
    """GLA by the chunk-parallel GPU kernels (``interpret=True``: Pallas' interpreter).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16).
      gk: per-channel log decays ``[B, T, H, K]`` (≤ 0, float32).
      g: ``None``, ``[H]`` or ``[B, T, H]`` scalar log decays added to every channel.
      initial_state: ``None`` (zeros) or ``[B, H, K, V]``.
      scale: the query scale.
      tiles: the kernels' tiling.

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]`` float32).
    Differentiable in ``q, k, v, gk, g, initial_state``.
    """
    batch, num_tokens, heads, key_dim = q.shape
    q_p, k_p, v_p, h0 = layout.pad_inputs(q, k, v, initial_state, tiles.chunk)
    log_decay = gk.astype(F32)
    gate = layout.scalar_gate(g, (batch, num_tokens, heads))
    if gate is not None:
        log_decay = log_decay + gate[..., None]
    log_decay = layout.pad(log_decay, q_p.shape[1], q_p.shape[-1])
    options = Options(float(scale), tiles.chunk, bool(interpret))
    # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
    out, final = _gla(q_p, k_p, v_p, log_decay, h0, options, tiles)  # pyright: ignore[reportGeneralTypeIssues]
    return layout.unpad_outputs(out, final, num_tokens, key_dim, v.shape[-1])


def _forward(q, k, v, log_decay, h0, options: Options, tiles: GLATiles):
    interpret = options.interpret
    b = layout.chunk_cumsum(log_decay, tiles.chunk)
    h, final = state_forward(k, v, b, h0, tiles=tiles, interpret=interpret)
    scores = intra_scores(q, k, b, scale=options.scale, tiles=tiles, interpret=interpret)
    out = output(q, v, b, h, scores, scale=options.scale, tiles=tiles, interpret=interpret)
    return out, final, b, h, scores


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gla(q, k, v, log_decay, h0, options: Options, tiles: GLATiles):
    """Padded inputs (``log_decay`` the per-token per-channel log decays, ``g`` folded in)
    → ``(o, final_state)``."""
    out, final, _, _, _ = _forward(q, k, v, log_decay, h0, options, tiles)
    return out, final


def _gla_fwd(q, k, v, log_decay, h0, options: Options, tiles: GLATiles):
    out, final, b, h, scores = _forward(q, k, v, log_decay, h0, options, tiles)
    return (out, final), (q, k, v, b, h, scores)


def _gla_bwd(options: Options, tiles: GLATiles, residuals, cotangents):
    q, k, v, b, h, scores = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(v.dtype)
    scale, interpret = options.scale, options.interpret
    dh, dh0 = state_backward(
        q, d_out, b, d_final.astype(F32), scale=scale, tiles=tiles, interpret=interpret
    )
    da = d_scores(d_out, v, scale=scale, tiles=tiles, interpret=interpret)
    to_end = layout.to_chunk_end(b, tiles.chunk)
    dv = value_grads(scores, d_out, k, to_end, dh, tiles=tiles, interpret=interpret)
    dq_intra, dk_intra, x_intra = intra_grads(q, k, b, da, tiles=tiles, interpret=interpret)
    dq, dk, d_log_decay = inter_grads(
        q,
        k,
        b,
        v,
        d_out,
        h,
        dh,
        dq_intra,
        dk_intra,
        x_intra,
        scale=scale,
        tiles=tiles,
        interpret=interpret,
    )
    return dq, dk, dv, d_log_decay, dh0


_gla.defvjp(_gla_fwd, _gla_bwd)
