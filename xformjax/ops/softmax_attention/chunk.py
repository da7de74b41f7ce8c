"""Blockwise (flash-attention) form of softmax / sigmoid attention.

Queries and keys are cut into blocks of ``C``. Every query block visits a
fixed, static list of key blocks (all of them; or, with a ``window``, only
the few its window can reach), one ``lax.scan`` step per visit, all query
blocks at once. Softmax keeps the online-softmax running maximum ``m``,
denominator ``l`` and accumulator::

    m'   = max(m, max_j s_j)
    l'   = e^{m−m'} l + Σ_j e^{s_j−m'}
    acc' = e^{m−m'} acc + Σ_j e^{s_j−m'} v_j

and finishes with ``o = acc / l`` and ``lse = m + log l``. Sigmoid attention
just accumulates ``σ(s_j + b) v_j``. The backward (``jax.custom_vjp``)
recomputes each block's weights from ``lse`` instead of storing them, so
forward and backward memory are O(T·C), never O(T²); with a window the time
is O(T·w) too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xformjax.ops.common import round_up
from xformjax.ops.softmax_attention.masking import AttentionMask
from xformjax.ops.softmax_attention.parallel import group_heads, ungroup_heads


def _visits(
    num_q_blocks: int, num_k_blocks: int, first_k_block: int, chunk: int, mask: AttentionMask
) -> tuple[np.ndarray, np.ndarray]:
    """Static schedule: key block visited by query block ``i`` at step ``s``, and
    whether that visit is real (in range, not a duplicate)."""
    if mask.window is None:
        blocks = np.broadcast_to(np.arange(num_k_blocks)[:, None], (num_k_blocks, num_q_blocks))
        return blocks.astype(np.int32), np.ones(blocks.shape, bool)
    reach = math.ceil((mask.window - 1) / chunk)
    deltas = np.arange(0 if mask.causal else -reach, reach + 1)
    diagonal = first_k_block + np.arange(num_q_blocks)
    blocks = diagonal[None, :] - deltas[:, None]
    real = (blocks >= 0) & (blocks < num_k_blocks)
    return np.clip(blocks, 0, num_k_blocks - 1).astype(np.int32), real


def _block_mask(mask, q_pos, q_seq, k_pos, k_seq, k_valid, real):
    """``[Bs, 1, 1, NQ, C, C]`` visibility of each visited key block from each query
    block (``q_seq``, ``k_seq``: ``[Bs, NQ, C]`` document ids; broadcasts against the
    logits ``[B, Hkv, G, NQ, C, C]``)."""
    allowed = mask.allowed(
        q_pos[:, :, None], k_pos[:, None, :], q_seq[..., :, None], k_seq[..., None, :]
    )
    allowed = allowed & k_valid[:, None, :] & real[:, None, None]
    return allowed[:, None, None]


def _make_blockwise(
    kind: str, mask: AttentionMask, blocks: np.ndarray, real: np.ndarray, chunk: int, num_keys: int
):
    """Build the custom-VJP blockwise attention for one static configuration."""
    # numpy, not jnp: a jnp array made here, under a trace (a lax.scan body), would be
    # a tracer that blockwise_bwd closes over and leaks when traced later
    schedule = (blocks, real)

    def visit(k_blocks, v_blocks, k_seq_blocks, step_blocks):
        k_pos = step_blocks[:, None] * chunk + jnp.arange(chunk)
        return (
            k_blocks[:, :, step_blocks],
            v_blocks[:, :, step_blocks],
            k_pos,
            k_seq_blocks[:, step_blocks],
            k_pos < num_keys,
        )

    def weights_for(q_blocks, q_pos, q_seq, bias, stats, k_blk, k_pos, k_seq, k_valid, real_s):
        """Recompute one visit's attention weights (softmax from ``lse = stats``)."""
        logits = jnp.einsum("bhgncd,bhnjd->bhgncj", q_blocks, k_blk)
        allowed = _block_mask(mask, q_pos, q_seq, k_pos, k_seq, k_valid, real_s)
        if kind == "softmax":
            return jnp.where(allowed, jnp.exp(logits - stats[..., None]), 0.0)
        return jnp.where(allowed, jax.nn.sigmoid(logits + bias[:, None, None, :, :, None]), 0.0)

    def forward(q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias):
        shape = q_blocks.shape[:-1]
        acc0 = jnp.zeros(shape + (v_blocks.shape[-1],), q_blocks.dtype)

        if kind == "sigmoid":

            def sigmoid_step(acc, xs):
                step_blocks, real_s = xs
                k_blk, v_blk, k_pos, k_seq, k_valid = visit(
                    k_blocks, v_blocks, k_seq_blocks, step_blocks
                )
                weights = weights_for(
                    q_blocks, q_pos, q_seq, bias, None, k_blk, k_pos, k_seq, k_valid, real_s
                )
                return acc + jnp.einsum("bhgncj,bhnjv->bhgncv", weights, v_blk), None

            acc, _ = jax.lax.scan(sigmoid_step, acc0, schedule)
            return acc, jnp.zeros(shape, q_blocks.dtype)

        def softmax_step(carry, xs):
            running_max, denominator, acc = carry
            step_blocks, real_s = xs
            k_blk, v_blk, k_pos, k_seq, k_valid = visit(
                k_blocks, v_blocks, k_seq_blocks, step_blocks
            )
            logits = jnp.einsum("bhgncd,bhnjd->bhgncj", q_blocks, k_blk)
            allowed = _block_mask(mask, q_pos, q_seq, k_pos, k_seq, k_valid, real_s)
            logits = jnp.where(allowed, logits, -jnp.inf)
            new_max = jnp.maximum(running_max, logits.max(-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            weights = jnp.exp(logits - safe_max[..., None])
            correction = jnp.exp(running_max - safe_max)
            denominator = correction * denominator + weights.sum(-1)
            acc = correction[..., None] * acc + jnp.einsum("bhgncj,bhnjv->bhgncv", weights, v_blk)
            return (new_max, denominator, acc), None

        init = (jnp.full(shape, -jnp.inf, q_blocks.dtype), jnp.zeros(shape, q_blocks.dtype), acc0)
        (running_max, denominator, acc), _ = jax.lax.scan(softmax_step, init, schedule)
        seen = denominator > 0
        safe_denominator = jnp.where(seen, denominator, 1.0)
        lse = jnp.where(seen, running_max + jnp.log(safe_denominator), 0.0)
        return acc / safe_denominator[..., None], lse

    @jax.custom_vjp
    def blockwise(q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias):
        return forward(q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias)[0]

    def blockwise_fwd(q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias):
        out, lse = forward(q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias)
        return out, (q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias, out, lse)

    def blockwise_bwd(residuals, d_out):
        q_blocks, k_blocks, v_blocks, q_pos, q_seq, k_seq_blocks, bias, out, lse = residuals
        row_dot = jnp.sum(d_out * out, axis=-1)  # softmax: Σ_j p_j dp_j

        def step(carry, xs):
            d_q, d_k, d_v = carry
            step_blocks, real_s = xs
            k_blk, v_blk, k_pos, k_seq, k_valid = visit(
                k_blocks, v_blocks, k_seq_blocks, step_blocks
            )
            weights = weights_for(
                q_blocks, q_pos, q_seq, bias, lse, k_blk, k_pos, k_seq, k_valid, real_s
            )
            d_weights = jnp.einsum("bhgncv,bhnjv->bhgncj", d_out, v_blk)
            if kind == "softmax":
                d_logits = weights * (d_weights - row_dot[..., None])
            else:
                d_logits = d_weights * weights * (1.0 - weights)
            d_q = d_q + jnp.einsum("bhgncj,bhnjd->bhgncd", d_logits, k_blk)
            d_k = d_k.at[:, :, step_blocks].add(
                jnp.einsum("bhgncj,bhgncd->bhnjd", d_logits, q_blocks)
            )
            d_v = d_v.at[:, :, step_blocks].add(jnp.einsum("bhgncj,bhgncv->bhnjv", weights, d_out))
            return (d_q, d_k, d_v), None

        zeros = (jnp.zeros_like(q_blocks), jnp.zeros_like(k_blocks), jnp.zeros_like(v_blocks))
        (d_q, d_k, d_v), _ = jax.lax.scan(step, zeros, schedule)
        return d_q, d_k, d_v, None, None, None, None

    blockwise.defvjp(blockwise_fwd, blockwise_bwd)
    return blockwise


def attention_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kind: str,
    mask: AttentionMask,
    q_seq: jax.Array,
    k_seq: jax.Array,
    bias: jax.Array | None,
    chunk_size: int,
) -> jax.Array:
    """Arguments and result as :func:`attention_parallel`, plus the block size."""
    seq_rows = q_seq.shape[0]
    batch, num_queries = q.shape[:2]
    num_keys, kv_heads = k.shape[1], k.shape[2]
    q_offset = mask.q_offset
    assert not isinstance(q_offset, jax.Array)  # static here: kv_length needs another mode
    chunk = min(chunk_size, round_up(max(num_keys, 1), 16))
    front = q_offset % chunk  # align query blocks with key blocks
    num_q_blocks = round_up(front + num_queries, chunk) // chunk
    num_k_blocks = round_up(num_keys, chunk) // chunk
    blocks, real = _visits(num_q_blocks, num_k_blocks, q_offset // chunk, chunk, mask)

    q_rows = num_q_blocks * chunk
    q_pad = ((0, 0), (front, q_rows - front - num_queries), (0, 0), (0, 0))
    qg = group_heads(jnp.pad(q, q_pad), kv_heads)
    q_blocks = qg.reshape(qg.shape[:3] + (num_q_blocks, chunk, qg.shape[-1]))
    k_pad = ((0, 0), (0, num_k_blocks * chunk - num_keys), (0, 0), (0, 0))
    k_blocks, v_blocks = (
        jnp.moveaxis(jnp.pad(x, k_pad), 2, 1).reshape(batch, kv_heads, num_k_blocks, chunk, -1)
        for x in (k, v)
    )
    q_pos = (jnp.arange(q_rows) + q_offset - front).reshape(num_q_blocks, chunk)
    # padded query rows' outputs are dropped and padded keys are masked (k_valid):
    # their ids do not matter
    q_seq_blocks = jnp.pad(q_seq, ((0, 0), (front, q_rows - front - num_queries))).reshape(
        seq_rows, num_q_blocks, chunk
    )
    k_seq_blocks = jnp.pad(k_seq, ((0, 0), (0, num_k_blocks * chunk - num_keys))).reshape(
        k_seq.shape[0], num_k_blocks, chunk
    )
    bias_blocks = (
        jnp.zeros((1, q_rows), q.dtype)
        if bias is None
        else jnp.pad(bias, ((0, 0), (front, q_rows - front - num_queries)))
    )
    bias_blocks = bias_blocks.reshape(bias_blocks.shape[0], num_q_blocks, chunk)

    blockwise = _make_blockwise(kind, mask, blocks, real, chunk, num_keys)
    out = blockwise(q_blocks, k_blocks, v_blocks, q_pos, q_seq_blocks, k_seq_blocks, bias_blocks)
    out = out.reshape(out.shape[:3] + (q_rows, out.shape[-1]))[:, :, :, front : front + num_queries]
    return ungroup_heads(out)
