"""Fused chunked linear attention (lightning-attention-2 tiling), forward and backward.

    S_t = exp(g_t) · diag(exp(gk_t)) · S_{t-1} + k_t v_tᵀ      o_t = scale · S_tᵀ q_t

Gates: none, ``g [H]`` (per-head constant, lightning attention / RetNet),
``g [B, T, H]`` (per token) — scalar decay masks — and ``gk [B, T, H, K]``
(GLA, ``g`` folded in) — exact per-channel decays. On GPUs the chunk-parallel
kernels of ``gpu/linear_attention.py`` (scalar) and ``gpu/gla.py`` (per
channel) run; on TPUs those of ``tpu/linear_attention.py`` and ``tpu/gla.py``
(chunk ``config.chunk_size``, or ``config.channel_chunk_size`` per channel).
``platform.py`` picks the flavour when the program is lowered.

Prefer :func:`xformjax.ops.linear_attention` with ``backend="pallas"`` (or
``None`` on a GPU/TPU), which validates inputs and falls back to XLA for what
the kernels do not cover; this function assumes valid inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import layout
from .config import ScanOptions, Target, block_config, padded_feature
from .gpu import gla as gpu_gla
from .gpu import linear_attention as gpu_linear_attention
from .platform import on_platforms
from .tpu import gla as tpu_gla
from .tpu import linear_attention as tpu_linear_attention


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    gk: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    target: Target | None = None,
    interpret: bool | None = None,
    cpu_fallback: Callable | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated linear attention by the Pallas kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16).
      g: log decay ``[H]`` or ``[B, T, H]``; gk: per-channel log decay ``[B, T, H, K]``.
      scale: defaults to ``K ** -0.5``.
      initial_state: ``[B, H, K, V]``.
      target, interpret: pin a kernel flavour (tests); by default the platform
        the program is lowered for decides (``platform.on_platforms``).
      cpu_fallback: called as ``cpu_fallback(q, k, v, g=..., gk=..., initial_state=...)``
        in the CPU lowering instead of the interpreted kernel; returns
        ``(o, final_state)`` with the kernel's shapes and dtypes.

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]`` float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    present = {"g": g, "gk": gk, "initial_state": initial_state}
    names = [name for name, x in present.items() if x is not None]

    def run(q, k, v, *optional, target, interpret):
        given = dict(zip(names, optional))
        return _run(
            q,
            k,
            v,
            given.get("g"),
            given.get("gk"),
            given.get("initial_state"),
            scale=scale,
            target=target,
            interpret=interpret,
        )

    def cpu(q, k, v, *optional):
        assert cpu_fallback is not None  # cpu is passed on only when it is given
        return cpu_fallback(q, k, v, **dict(zip(names, optional)))

    return on_platforms(
        run,
        q,
        k,
        v,
        *(present[n] for n in names),
        target=target,
        interpret=interpret,
        cpu=None if cpu_fallback is None else cpu,
    )


def _run(q, k, v, g, gk, initial_state, *, scale, target, interpret):
    if target == "gpu":
        if gk is not None:
            return gpu_gla.gated_linear_attention(
                q, k, v, gk, g, initial_state, scale=scale, interpret=interpret
            )
        return gpu_linear_attention.linear_attention(
            q, k, v, g, initial_state, scale=scale, interpret=interpret
        )
    return _tpu(q, k, v, g, gk, initial_state, scale=scale, interpret=interpret)


def _tpu(q, k, v, g, gk, initial_state, *, scale, interpret):
    """On TPUs: the chunk-parallel kernels of ``tpu/linear_attention.py`` (scalar gates) and
    ``tpu/gla.py`` (per-channel gates)."""
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    config = block_config("tpu")
    chunk_size = config.chunk_size if gk is None else config.channel_chunk_size
    dtype = jnp.result_type(q, k, v)
    length = layout.padded_length(num_tokens, chunk_size)
    key_width, value_width = padded_feature(key_dim, "tpu"), padded_feature(value_dim, "tpu")
    q_rows = layout.to_rows(q.astype(dtype), length, key_width)
    k_rows = layout.to_rows(k.astype(dtype), length, key_width)
    v_rows = layout.to_rows(v.astype(dtype), length, value_width)
    h0 = layout.state_to_rows(initial_state, batch, heads, key_width, value_width)
    options = ScanOptions(scale, chunk_size, config.inverse_block, "tpu", interpret)
    log_decay = layout.token_gate_rows(g, batch, num_tokens, heads, length)
    if gk is None:
        b = layout.chunk_cumsum(log_decay, chunk_size)
        # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
        out, final = tpu_linear_attention.scalar_attention(q_rows, k_rows, v_rows, b, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    else:
        log_decay = layout.to_rows(gk.astype(jnp.float32), length, key_width) + log_decay[..., None]
        b = layout.chunk_cumsum(log_decay, chunk_size)
        out, final = tpu_gla.channel_attention(q_rows, k_rows, v_rows, b, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    return (
        layout.from_rows(out, batch, num_tokens, value_dim),
        layout.state_from_rows(final, batch, key_dim, value_dim),
    )
