"""Fused chunked delta rule (gated, β in (0, 2)), forward and backward.

    S' = exp(g_t) · S_{t-1}
    S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ          o_t = scale · S_tᵀ q_t

On GPUs, the chunk-parallel kernels of ``gpu/delta_rule.py`` (fla's
decomposition: chunk-local WY/UT transform, a sequential state kernel over
value tiles, chunk-parallel outputs and gradients); on TPUs the same
decomposition in Mosaic (``tpu/delta_rule.py``): the WY/UT transform
``A = tril(diag(β)(KKᵀ ⊙ Γ), −1)``, ``T = (I + A)⁻¹`` (substitution in 16×16
diagonal blocks, then a short matmul series; ``chunk_math.unit_lower_inverse``),
``W = T diag(β)(K ⊙ e^b)``, ``U = T diag(β)V`` parallel over chunks, the state
recurrence (pseudo-values ``U − W h``) sequential over chunks and parallel over
value tiles, then outputs and gradients parallel over chunks.

Gates: none, ``g [H]`` or ``g [B, T, H]``. The per-channel gate (``gk``, KDA)
and packed sequences run in XLA (:func:`xformjax.ops.delta_rule` falls back).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import layout
from .config import ScanOptions, Target, block_config, padded_feature
from .gpu import delta_rule as gpu_delta_rule
from .platform import on_platforms
from .tpu import delta_rule as tpu_delta_rule


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    target: Target | None = None,
    interpret: bool | None = None,
    cpu_fallback: Callable | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule by the Pallas kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``.
      g: log decay ``[H]`` or ``[B, T, H]``.
      scale, initial_state, target, interpret, cpu_fallback: as
        :func:`xformjax.kernels.linear_attention` (``cpu_fallback`` is called as
        ``cpu_fallback(q, k, v, beta, g=..., initial_state=...)``).

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]`` float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    present = {"g": g, "initial_state": initial_state}
    names = [name for name, x in present.items() if x is not None]

    def run(q, k, v, beta, *optional, target, interpret):
        given = dict(zip(names, optional))
        return _run(
            q,
            k,
            v,
            beta,
            given.get("g"),
            given.get("initial_state"),
            scale=scale,
            target=target,
            interpret=interpret,
        )

    def cpu(q, k, v, beta, *optional):
        assert cpu_fallback is not None  # cpu is passed on only when it is given
        return cpu_fallback(q, k, v, beta, **dict(zip(names, optional)))

    return on_platforms(
        run,
        q,
        k,
        v,
        beta,
        *(present[n] for n in names),
        target=target,
        interpret=interpret,
        cpu=None if cpu_fallback is None else cpu,
    )


def _run(q, k, v, beta, g, initial_state, *, scale, target, interpret):
    if target == "gpu":
        return gpu_delta_rule.delta_rule(
            q, k, v, beta, g, initial_state, scale=scale, interpret=interpret
        )
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    config = block_config(target)
    chunk_size = config.chunk_size
    length = layout.padded_length(num_tokens, chunk_size)
    key_width = padded_feature(key_dim, target)
    value_width = padded_feature(value_dim, target)
    dtype = jnp.result_type(q, k, v)
    q_rows = layout.to_rows(q.astype(dtype), length, key_width)
    k_rows = layout.to_rows(k.astype(dtype), length, key_width)
    v_rows = layout.to_rows(v.astype(dtype), length, value_width)
    beta_rows = layout.to_rows(beta.astype(jnp.float32)[..., None], length, width=1)
    h0 = layout.state_to_rows(initial_state, batch, heads, key_width, value_width)
    b = layout.chunk_cumsum(layout.token_gate_rows(g, batch, num_tokens, heads, length), chunk_size)
    options = ScanOptions(scale, chunk_size, config.inverse_block, target, interpret)
    # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
    out, final = tpu_delta_rule.delta(q_rows, k_rows, v_rows, b, beta_rows, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    return (
        layout.from_rows(out, batch, num_tokens, value_dim),
        layout.state_from_rows(final, batch, key_dim, value_dim),
    )
