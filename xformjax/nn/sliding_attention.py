"""Local softmax attention with persistent (always visible) keys, linear in ``T``.

The attention branches of Titans' MAG and MAC variants ("Titans: Learning to
Memorize at Test Time", Behrouz et al. 2025). For a query at absolute position
``t`` with ``P`` persistent keys/values ``(k^p, v^p)`` (learned, position-free):

    sliding window (MAG):  keys j ∈ {persistent} ∪ {t − W + 1, …, t}
    o_t = Σ_j softmax_j(q_t · k_j / √K) v_j

:func:`sliding_window_attention` computes it blockwise: queries in blocks of
``W`` (the window); block ``b`` attends to the persistent keys and the key blocks
``b − 1`` and ``b`` (``P + 2W`` keys, masked to the window), so time and memory are
``O(T · (P + W))``. A cache of the last ``W − 1`` keys/values (oldest first, the
invalid ones in front) carries the window across calls, so decoding token by
token equals the full forward. Scores are float32 and masked with ``−inf`` before
the exponential; every query sees at least itself, so no row is fully masked.

Packed documents: with ``segment_ids`` (the new tokens' document ids ``[B, T]``) and
``cache_segment_ids`` (the cached tokens', ``[B, W − 1]``) a query sees only window
keys of its own document (equal ids); the persistent keys stay visible to every
query, as in a document run alone. The caller keeps the cache's ids beside the
cache: after a call they are ``concatenate([cache_segment_ids, segment_ids])[:, T:]``.

:func:`masked_attention` is the dense core (scores, mask, softmax, values) the
blockwise form and MAC's per-segment attention share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over explicit keys.

    Args:
      q: ``[..., Q, H, K]``; k: ``[..., S, H, K]``; v: ``[..., S, H, V]`` (same
        leading axes).
      mask: boolean, broadcastable to ``[..., H, Q, S]``; every query row must have a
        visible key.

    Returns:
      ``[..., Q, H, V]`` in float32 (or wider).
    """
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], dtype))
    scores = jnp.einsum("...qhk,...shk->...hqs", q.astype(dtype), k.astype(dtype)) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.einsum("...hqs,...shv->...qhv", weights, v.astype(dtype))


def with_persistent(
    k: jax.Array,
    v: jax.Array,
    persistent_k: jax.Array | None,
    persistent_v: jax.Array | None,
    blocks_shape: tuple[int, ...],
):
    """Prepend the persistent keys/values ``[P, H, ·]`` to per-block keys ``[..., S, H, ·]``
    (broadcast over ``blocks_shape`` = the leading axes); returns ``(k, v, P)``."""
    if persistent_k is None:
        return k, v, 0
    assert persistent_v is not None  # persistent keys come with persistent values
    count = persistent_k.shape[0]
    pk = jnp.broadcast_to(persistent_k.astype(k.dtype), blocks_shape + persistent_k.shape)
    pv = jnp.broadcast_to(persistent_v.astype(v.dtype), blocks_shape + persistent_v.shape)
    return jnp.concatenate([pk, k], -3), jnp.concatenate([pv, v], -3), count


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    cache_k: jax.Array,
    cache_v: jax.Array,
    cached: jax.Array | int,
    persistent_k: jax.Array | None = None,
    persistent_v: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal sliding-window attention of ``T`` new tokens after a cache.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (the new tokens).
      window: ``W ≥ 1``; a query sees itself and the ``W − 1`` tokens before it.
      cache_k, cache_v: ``[B, W − 1, H, ·]``, the previous tokens, oldest first.
      cached: how many of the cache's slots (the last ones) hold real tokens
        (``min(position, W − 1)``; may be traced).
      persistent_k, persistent_v: ``[P, H, ·]`` keys every query sees, or ``None``.
      segment_ids: int ``[B, T]``, the new tokens' documents (equal ids ⇔ same
        document), or ``None`` (one document with the cache).
      cache_segment_ids: int ``[B, W − 1]``, the cached tokens' documents (default:
        all 0, i.e. the cache belongs to the document of id 0); only with
        ``segment_ids``.

    Returns:
      ``(o [B, T, H, V] float32, new cache_k, new cache_v)``.
    """
    batch, length, heads, _ = q.shape
    blocks = -(-length // window)
    padded = blocks * window
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q_blocks = jnp.pad(q, pad).reshape(batch, blocks, window, heads, q.shape[-1])

    def key_blocks(cache, new):
        # [one empty slot, cache (W − 1), new (padded)]: W·(blocks + 1) rows; query
        # block b (rows W(b+1) …) needs the rows of key blocks b and b + 1.
        front = jnp.zeros((batch, 1) + new.shape[2:], new.dtype)
        rows = jnp.concatenate([front, cache.astype(new.dtype), jnp.pad(new, pad)], 1)
        rows = rows.reshape((batch, blocks + 1, window) + new.shape[2:])
        return jnp.concatenate([rows[:, :-1], rows[:, 1:]], 2)  # [B, nb, 2W, H, ·]

    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    keys, values = key_blocks(cache_k, k.astype(dtype)), key_blocks(cache_v, v.astype(dtype))
    keys, values, count = with_persistent(keys, values, persistent_k, persistent_v, (batch, blocks))
    # query i of block b is row W + bW + i; key s of the pair is row bW + s
    i = jnp.arange(window)[:, None]
    s = jnp.arange(2 * window)[None, :]
    b = jnp.arange(blocks)[:, None, None]
    local = (s >= i + 1) & (s <= i + window) & (b * window + s >= window - cached)
    mask = jnp.concatenate([jnp.ones((blocks, window, count), bool), local], -1)[None]
    if segment_ids is not None:  # keys of another document are hidden: [B, nb, W, P + 2W]
        if cache_segment_ids is None:
            cache_segment_ids = jnp.zeros((batch, window - 1), jnp.int32)
        ids = jnp.asarray(segment_ids, jnp.int32)[..., None, None]  # [B, T, 1, 1]
        cached_ids = jnp.asarray(cache_segment_ids, jnp.int32)[..., None, None]
        key_ids = key_blocks(cached_ids, ids)[..., 0, 0]  # [B, nb, 2W]
        query_ids = jnp.pad(ids[..., 0, 0], ((0, 0), (0, padded - length)))
        query_ids = query_ids.reshape(batch, blocks, window)
        same = query_ids[..., :, None] == key_ids[..., None, :]
        persistent = jnp.ones((batch, blocks, window, count), bool)
        mask = mask & jnp.concatenate([persistent, same], -1)
    o = masked_attention(q_blocks, keys, values, mask[:, :, None])
    o = o.reshape(batch, padded, heads, -1)[:, :length]
    new_k = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], 1)[:, length:]
    new_v = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], 1)[:, length:]
    return o, new_k, new_v
