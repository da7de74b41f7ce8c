"""Between the ops' ``[B, T, H, D]`` layout and the kernels' padded head-major rows.

Kernels see ``R = B·H`` rows of ``L`` tokens (``T`` padded with zeros up to a
multiple of the chunk) and feature widths padded (``config.padded_feature``).
Zero padding changes nothing: a padded token has ``k = v = 0`` (no update),
``g = 0`` (no decay) and ``β = 0``; padded feature columns stay zero in every
state and output and are sliced away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .gates import compensated_cumsum


def padded_length(num_tokens: int, chunk_size: int) -> int:
    return -(-num_tokens // chunk_size) * chunk_size


def to_rows(x: jax.Array, length: int, width: int) -> jax.Array:
    """``[B, T, H, D]`` → ``[B·H, L, width]`` (zero-padded)."""
    batch, num_tokens, heads, dim = x.shape
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, num_tokens, dim)
    return jnp.pad(x, ((0, 0), (0, length - num_tokens), (0, width - dim)))


def from_rows(x: jax.Array, batch: int, num_tokens: int, dim: int) -> jax.Array:
    """``[B·H, L, D']`` → ``[B, T, H, D]``."""
    heads = x.shape[0] // batch
    x = x[:, :num_tokens, :dim].reshape(batch, heads, num_tokens, dim)
    return jnp.moveaxis(x, 1, 2)


def token_gate_rows(
    g: jax.Array | None, batch: int, num_tokens: int, heads: int, length: int
) -> jax.Array:
    """The op's scalar gate (``None``, ``[H]`` or ``[B, T, H]``) as float32 ``[B·H, L]``."""
    if g is None:
        return jnp.zeros((batch * heads, length), jnp.float32)
    g = g.astype(jnp.float32)
    if g.ndim == 1:
        g = jnp.broadcast_to(g[None, None, :], (batch, num_tokens, heads))
    g = jnp.moveaxis(g, 2, 1).reshape(batch * heads, num_tokens)
    return jnp.pad(g, ((0, 0), (0, length - num_tokens)))


def chunk_cumsum(log_decay: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """``[R, L]`` or ``[R, L, K]`` log decays → the cumulative sum inside each chunk,
    ``[R, L, 1]`` or ``[R, L, K]``, as the compensated pair ``(hi, lo)`` of ``gates.py``
    (float32, each of that shape)."""
    if log_decay.ndim == 2:
        log_decay = log_decay[..., None]
    rows, length, width = log_decay.shape
    chunks = log_decay.reshape(rows, length // chunk_size, chunk_size, width)
    hi, lo = compensated_cumsum(chunks, 2)
    return hi.reshape(rows, length, width), lo.reshape(rows, length, width)


def state_to_rows(
    state: jax.Array | None, batch: int, heads: int, key_width: int, value_width: int
) -> jax.Array:
    """``[B, H, K, V]`` (or ``None``: zeros) → float32 ``[B·H, K', V']``."""
    if state is None:
        return jnp.zeros((batch * heads, key_width, value_width), jnp.float32)
    _, _, key_dim, value_dim = state.shape
    state = state.astype(jnp.float32).reshape(batch * heads, key_dim, value_dim)
    return jnp.pad(state, ((0, 0), (0, key_width - key_dim), (0, value_width - value_dim)))


def state_from_rows(state: jax.Array, batch: int, key_dim: int, value_dim: int) -> jax.Array:
    """``[B·H, K', V']`` → ``[B, H, K, V]``."""
    heads = state.shape[0] // batch
    return state[:, :key_dim, :value_dim].reshape(batch, heads, key_dim, value_dim)
