"""Positional encodings applied to queries and keys ``[B, T, H, D]``.

- RoPE ("RoFormer"): rotate feature pairs ``(x_i, x_{i+D/2})`` by ``p·θ_i``,
  ``θ_i = base^{−2i/D}``; ``q_sᵀk_t`` then depends on ``s − t`` only.
- LRPE (TransNormerLLM's linearised relative positional encoding, the cosine
  form): ``x_p ↦ [x_p ⊙ cos(pθ), x_p ⊙ sin(pθ)]`` (``D → 2D``), so
  ``q_sᵀk_t = Σ_i q_i k_i cos((s − t)θ_i)`` — a relative encoding that keeps
  linear attention linear; ``θ_i = base^{−i/D}``.

``positions`` is an int array broadcastable to ``[B, T]`` (the absolute position
of every token, so decoding passes the cache length as the offset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _angles(positions: jax.Array, frequencies: jax.Array, dtype) -> jax.Array:
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    return positions.astype(dtype)[..., None, None] * frequencies.astype(dtype)  # [B,T,1,F]


def _float_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
    """RoPE on ``x`` ``[B, T, H, D]`` (``D`` even) at ``positions`` ``[B, T]`` or ``[T]``."""
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dimension; got D={dim}")
    dtype = _float_dtype(x)
    frequencies = base ** (-jnp.arange(0, dim // 2, dtype=dtype) * 2 / dim)
    angles = _angles(positions, frequencies, dtype)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(dtype), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    return rotated.astype(x.dtype)


def apply_lrpe(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
    """LRPE (cosine form) on ``x`` ``[B, T, H, D]`` → ``[B, T, H, 2D]``."""
    dim = x.shape[-1]
    dtype = _float_dtype(x)
    frequencies = base ** (-jnp.arange(dim, dtype=dtype) / dim)
    angles = _angles(positions, frequencies, dtype)
    xf = x.astype(dtype)
    return jnp.concatenate([xf * jnp.cos(angles), xf * jnp.sin(angles)], -1).astype(x.dtype)


def token_positions(offset: jax.Array | int, length: int) -> jax.Array:
    """``[T]`` positions ``offset, …, offset + T − 1``."""
    return jnp.asarray(offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
