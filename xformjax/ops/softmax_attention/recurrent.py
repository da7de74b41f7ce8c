"""Recurrent form of softmax / sigmoid attention: one query at a time against a KV cache.

For each query ``i`` in turn (``lax.scan``), attend to every visible key of the
cache ``k, v`` (``[B, Tk, Hkv, D]``). With ``Tq == 1`` this is one decoding step:
the new token's query against the whole cache, itself included. O(Tq·Tk)
time, O(Tk) memory per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.softmax_attention.masking import AttentionMask
from xformjax.ops.softmax_attention.parallel import attention_weights, group_heads, ungroup_heads


def attention_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kind: str,
    mask: AttentionMask,
    q_seq: jax.Array,
    k_seq: jax.Array,
    bias: jax.Array | None,
) -> jax.Array:
    """Arguments and result as :func:`attention_parallel`."""
    kv_heads = k.shape[2]
    qg = jnp.moveaxis(group_heads(q, kv_heads), 3, 0)  # [Tq, B, Hkv, G, D]
    k_pos = jnp.arange(k.shape[1])
    q_pos = jnp.arange(q.shape[1]) + mask.q_offset
    biases = jnp.zeros((1, q.shape[1]), q.dtype) if bias is None else bias

    def step(_, xs):
        q_i, pos_i, seq_i, bias_i = xs  # seq_i, bias_i: [Bs]
        logits = jnp.einsum("bhgd,bjhd->bhgj", q_i, k)
        allowed = mask.allowed(pos_i, k_pos, seq_i[:, None], k_seq)  # [Bs, Tk]
        weights = attention_weights(logits, allowed[:, None, None], kind, bias_i[:, None, None])
        return None, jnp.einsum("bhgj,bjhv->bhgv", weights, v)

    _, o = jax.lax.scan(step, None, (qg, q_pos, q_seq.T, biases.T))
    return ungroup_heads(jnp.moveaxis(o, 0, 3))
