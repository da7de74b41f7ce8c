"""Parallel form of softmax / sigmoid attention: the full masked Tq×Tk matrix.

    softmax:  o_i = Σ_j softmax_j(qᵢ·k_j [j visible]) v_j
    sigmoid:  o_i = Σ_j σ(qᵢ·k_j + b_i) [j visible] v_j

``q`` arrives pre-scaled. Grouped-query heads share key/value heads. Keys of
another document are masked before the exponential (``−inf`` for softmax, a zero
weight for sigmoid); every query sees at least itself, so no row is fully masked.
O(Tq·Tk) time and memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.softmax_attention.masking import AttentionMask


def group_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, T, Hq, D]`` → ``[B, Hkv, G, T, D]`` with ``Hq = Hkv·G``."""
    batch, length, q_heads, dim = q.shape
    q = q.reshape(batch, length, kv_heads, q_heads // kv_heads, dim)
    return jnp.transpose(q, (0, 2, 3, 1, 4))


def ungroup_heads(o: jax.Array) -> jax.Array:
    """``[B, Hkv, G, T, V]`` → ``[B, T, Hkv·G, V]``."""
    batch, kv_heads, group, length, dim = o.shape
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(batch, length, kv_heads * group, dim)


def attention_weights(
    logits: jax.Array, allowed: jax.Array, kind: str, bias: jax.Array | None
) -> jax.Array:
    """Normalised (softmax) or independent (sigmoid) weights over the last axis;
    ``bias`` broadcasts against ``logits`` without their last axis."""
    if kind == "softmax":
        return jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    assert bias is not None  # sigmoid attention always gets its per-query bias
    return jnp.where(allowed, jax.nn.sigmoid(logits + bias[..., None]), 0.0)


def attention_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kind: str,
    mask: AttentionMask,
    q_seq: jax.Array,
    k_seq: jax.Array,
    bias: jax.Array | None,
) -> jax.Array:
    """``q`` ``[B, Tq, Hq, D]``, ``k`` ``[B, Tk, Hkv, D]``, ``v`` ``[B, Tk, Hkv, V]`` → ``o``
    ``[B, Tq, Hq, V]``; the document ids ``q_seq`` ``[Bs, Tq]``, ``k_seq`` ``[Bs, Tk]``
    and ``bias`` ``[Bs, Tq]`` (``Bs`` is ``B`` or 1)."""
    kv_heads = k.shape[2]
    qg = group_heads(q, kv_heads)
    logits = jnp.einsum("bhgid,bjhd->bhgij", qg, k)
    q_pos = jnp.arange(q.shape[1]) + mask.q_offset
    k_pos = jnp.arange(k.shape[1])
    allowed = mask.allowed(q_pos[:, None], k_pos[None, :], q_seq[:, :, None], k_seq[:, None, :])
    bias = None if bias is None else bias[:, None, None, :]
    weights = attention_weights(logits, allowed[:, None, None], kind, bias)
    return ungroup_heads(jnp.einsum("bhgij,bjhv->bhgiv", weights, v))
