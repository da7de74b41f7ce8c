"""The GPU kernels' view of the ops' arrays: token-major ``[B, L, H, D]``, padded.

``L`` is ``T`` rounded up to a multiple of the chunk and ``D`` a power of two of
at least 16 (``config.padded_feature(dim, "gpu")``); nothing is padded when the
shape already fits, so the common case (``T % 64 == 0``, ``D ∈ {64, 128, 256}``)
costs no copy. Padding changes nothing: a padded token has ``k = v = 0``,
``g = 0`` and ``β = 0``; padded feature columns stay zero everywhere.

Gates enter the kernels as the chunk-local cumulative log decay ``b``: float32
``[B, L, H]`` (scalar gate) or ``[B, L, H, K]`` (per channel), with
``b_t = Σ_{s ≤ t, s in t's chunk} g_s`` (computed here, in XLA: it is tiny), as a
compensated pair ``(hi, lo)`` of two such arrays (``gates.py``: differences
``b_i − b_j`` stay exact after a strong gate).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..config import padded_feature
from ..gates import compensated_cumsum

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of one chunked call (its ``custom_vjp``'s non-differentiable argument).

    Attributes:
      scale: the query scale.
      chunk_size: tokens per chunk.
      interpret: run every ``pallas_call`` in Pallas' interpreter.
    """

    scale: float
    chunk_size: int = 64
    interpret: bool = False


def padded_length(num_tokens: int, chunk_size: int) -> int:
    return -(-num_tokens // chunk_size) * chunk_size


def pad(x: jax.Array, length: int, width: int | None = None) -> jax.Array:
    """Zero-pad axis 1 (tokens) to ``length`` and, when given, the last axis to ``width``."""
    pads = [(0, 0)] * x.ndim
    pads[1] = (0, length - x.shape[1])
    if width is not None:
        pads[-1] = (0, width - x.shape[-1])
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads)


def feature_width(dim: int) -> int:
    return padded_feature(dim, "gpu")


def scalar_gate(g: jax.Array | None, shape: tuple[int, int, int]) -> jax.Array | None:
    """The op's ``g`` (``None``, ``[H]`` or ``[B, T, H]``) as float32 ``[B, T, H]``
    (``None`` stays ``None``: no gate)."""
    if g is None:
        return None
    g = g.astype(F32)
    return jnp.broadcast_to(g, shape) if g.ndim == 1 else g


#: A gate as the kernels take it: the compensated pair ``(hi, lo)`` of ``b`` (``gates.py``).
Gate = tuple[jax.Array, jax.Array]


def chunk_gate(
    g: jax.Array | None, shape: tuple[int, int, int], length: int, chunk_size: int
) -> Gate | None:
    """The op's scalar ``g`` (``None``, ``[H]`` or ``[B, T, H]``, ``shape = (B, T, H)``) as the
    kernels' ``b``: padded to ``length`` tokens, its cumulative sum inside each chunk
    (a pair of float32 ``[B, L, H]``, :func:`chunk_cumsum`; ``None`` stays ``None``)."""
    gate = scalar_gate(g, shape)
    return None if gate is None else chunk_cumsum(pad(gate, length), chunk_size)


def chunk_cumsum(log_decay: jax.Array, chunk_size: int) -> Gate:
    """``[B, L, H]`` or ``[B, L, H, K]`` log decays → their cumulative sums inside each
    chunk as the compensated pair ``(hi, lo)`` (float32, each of the same shape); ``L``
    must be a multiple of ``chunk_size``."""
    batch, length = log_decay.shape[:2]
    rest = log_decay.shape[2:]
    chunks = log_decay.astype(F32).reshape(batch, length // chunk_size, chunk_size, *rest)
    hi, lo = compensated_cumsum(chunks, 2)
    return hi.reshape(batch, length, *rest), lo.reshape(batch, length, *rest)


def to_chunk_end(b: Gate, chunk_size: int) -> jax.Array:
    """``b_last − b`` inside each chunk (float32, the shape of each part) from the
    compensated pair ``b = (hi, lo)``: ``(hi_last − hi) + (lo_last − lo)``, exact after a
    strong gate. For kernels that only need the decay to the chunk's end (one tile to
    read instead of two)."""
    hi, lo = b
    batch, length = hi.shape[:2]
    rest = hi.shape[2:]
    hi = hi.reshape(batch, length // chunk_size, chunk_size, *rest)
    lo = lo.reshape(batch, length // chunk_size, chunk_size, *rest)
    end = (hi[:, :, -1:] - hi) + (lo[:, :, -1:] - lo)
    return end.reshape(batch, length, *rest)


def pad_state(state: jax.Array | None, shape: tuple[int, int, int, int]) -> jax.Array:
    """``[B, H, K, V]`` (or ``None``: zeros) → float32 padded to ``shape``."""
    if state is None:
        return jnp.zeros(shape, F32)
    pads = [(0, target - size) for size, target in zip(state.shape, shape)]
    return jnp.pad(state.astype(F32), pads)


def unpad_tokens(x: jax.Array, num_tokens: int, dim: int) -> jax.Array:
    return x[:, :num_tokens, :, :dim]


def unpad_state(state: jax.Array, key_dim: int, value_dim: int) -> jax.Array:
    return state[:, :, :key_dim, :value_dim]


def pad_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    initial_state: jax.Array | None,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(q, k, v, h0)`` as the kernels take them: ``q, k [B, L, H, K']``, ``v [B, L, H, V']``
    in ``result_type(q, k, v)`` (``L`` a multiple of ``chunk_size``, ``K', V'`` the padded
    widths) and ``h0 [B, H, K', V']`` float32 (zeros for ``None``)."""
    batch, num_tokens, heads, key_dim = q.shape
    dtype = jnp.result_type(q, k, v)
    length = padded_length(num_tokens, chunk_size)
    key_width, value_width = feature_width(key_dim), feature_width(v.shape[-1])
    return (
        pad(q.astype(dtype), length, key_width),
        pad(k.astype(dtype), length, key_width),
        pad(v.astype(dtype), length, value_width),
        pad_state(initial_state, (batch, heads, key_width, value_width)),
    )


def unpad_outputs(
    out: jax.Array, final: jax.Array, num_tokens: int, key_dim: int, value_dim: int
) -> tuple[jax.Array, jax.Array]:
    """The padded ``(o, final_state)`` cut back to ``[B, T, H, V]`` and ``[B, H, K, V]``."""
    return unpad_tokens(out, num_tokens, value_dim), unpad_state(final, key_dim, value_dim)
