"""LASP-2H: softmax / sigmoid attention under the same sequence split as LASP-2.

Queries, keys and values arrive split along T over the mesh axis (``T_loc = T/n``
tokens on each device; device ``s`` holds positions ``s·T_loc … (s+1)·T_loc − 1``).

- **Full causal (or bidirectional) attention**: one all-gather of the packed keys
  and values (grouped-query heads keep it to ``B·T·Hkv·(D+V)``); each device attends
  from its local queries to the gathered keys with the causal offset ``s·T_loc``.
- **Sliding window ``w`` (causal)**: only the ``w − 1`` keys before the shard are
  needed. They live on the ``r = ⌈(w−1)/T_loc⌉`` previous devices, so each device
  receives ``r`` neighbour shards by ``ppermute`` (``r`` collectives of
  ``B·T_loc·Hkv·(D+V)``, independent of T); keys before position 0 (on the first
  devices) are hidden by the mask. If ``r ≥ n − 1`` the all-gather is used.

Packed documents (``segment_ids`` ``[B, T]``, split along T like the queries): the
key ids travel like the keys (one more all-gather, or ``ppermute`` s, of the small
int ids ``[B, T_loc]``), so each query attends only to keys of its own document,
wherever that document's earlier tokens live.

The local attention is the parallel form over ``[T_loc, keys]``; its backward is
JAX's transpose (a reduce-scatter, or the reversed ``ppermute`` s).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xformjax import ops
from xformjax.ops import common
from xformjax.ops.softmax_attention.masking import AttentionMask, document_sizes
from xformjax.ops.softmax_attention.parallel import attention_parallel
from xformjax.parallel.mesh import sequence_layout, spec_axes

#: the ``jax.named_scope`` of LASP-2H's shard_map (op names in compiled HLO carry it)
SCOPE = "lasp2h"
KINDS = {ops.softmax_attention: "softmax", ops.sigmoid_attention: "sigmoid"}


def attention_sequence_parallel(op, mesh, axis: str, shards: int):
    """LASP-2H version of ``op`` (``ops.softmax_attention`` / ``ops.sigmoid_attention``)."""
    kind = KINDS[op]
    name = op.__name__

    @functools.wraps(op)
    def parallel_op(
        q,
        k,
        v,
        *,
        causal=True,
        scale=None,
        window=None,
        cu_seqlens=None,
        mode="chunk",
        chunk_size=128,
        backend=None,
        kv_length=None,
        bias=None,
        segment_ids=None,
    ):
        del mode, chunk_size  # the local attention is the parallel form
        common.resolve_backend(name, backend)
        if cu_seqlens is not None or kv_length is not None:
            raise ValueError("sequence_parallel: cu_seqlens and kv_length are not supported")
        length = q.shape[1]
        if k.shape[1] != length or length % shards:
            raise ValueError(
                f"sequence_parallel: q and k need the same T, divisible by the "
                f"{axis!r} axis size {shards}; got {q.shape[1]} and {k.shape[1]}"
            )
        if window is not None and not causal:
            raise ValueError("sequence_parallel: a window needs causal=True")
        local_length = length // shards
        out_dtype = jnp.result_type(q, k, v)
        dtype = common.compute_dtype(q, k, v)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        batch = q.shape[0]
        if segment_ids is not None:
            if tuple(jnp.shape(segment_ids)) != (batch, length) or not jnp.issubdtype(
                jnp.result_type(segment_ids), jnp.integer
            ):
                raise ValueError(
                    f"sequence_parallel: `segment_ids` must be an integer array [B, T] = "
                    f"[{batch}, {length}]; got {common.shape_str(segment_ids)}"
                )
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if kind == "sigmoid" and bias is None:
            bias = (
                -math.log(length)
                if segment_ids is None
                else -jnp.log(document_sizes(segment_ids, segment_ids, None).astype(dtype))
            )
        # sigmoid attention's bias, one per query ([T] or [B, T], split along T like
        # the queries)
        biases = ()
        if kind == "sigmoid":
            bias = jnp.asarray(bias, dtype)
            biases = (jnp.broadcast_to(bias, bias.shape[:-1] + (length,)).reshape(-1, length),)
        ids = () if segment_ids is None else (segment_ids,)
        halo_shards = 0 if window is None else math.ceil((window - 1) / local_length)
        use_halo = window is not None and halo_shards < shards - 1

        def local(q, k, v, *extra):
            q = q.astype(dtype) * jnp.asarray(scale, dtype)
            index = jax.lax.axis_index(axis)
            key_dim = k.shape[-1]
            q_bias = extra[0] if biases else None
            local_ids = extra[-1] if ids else None
            packed = jnp.concatenate([k, v], -1).astype(dtype)

            def halo(x):  # the halo_shards previous shards, then this one
                pieces = [
                    jax.lax.ppermute(x, axis, [(j, j + shift) for j in range(shards - shift)])
                    for shift in range(halo_shards, 0, -1)
                ]
                return jnp.concatenate(pieces + [x], axis=1)

            def gather(x):
                return jax.lax.all_gather(x, axis, axis=1, tiled=True)

            collect = halo if use_halo else gather
            if use_halo:
                keys = halo(packed)
                offset = halo_shards * local_length
                hidden = jnp.maximum(halo_shards - index, 0) * local_length
                mask = AttentionMask(causal=True, window=window, q_offset=offset, kv_start=hidden)
            else:
                keys = gather(packed)  # one collective
                offset = index * local_length if causal else 0
                mask = AttentionMask(causal=causal, window=window, q_offset=offset)
            if local_ids is None:
                q_seq = jnp.zeros((1, local_length), jnp.int32)
                k_seq = jnp.zeros((1, keys.shape[1]), jnp.int32)
            else:
                q_seq, k_seq = local_ids, collect(local_ids)
            o = attention_parallel(
                q, keys[..., :key_dim], keys[..., key_dim:], kind, mask, q_seq, k_seq, q_bias
            )
            return o.astype(out_dtype)

        batch_part, heads_part = sequence_layout(
            dict(zip(mesh.axis_names, mesh.axis_sizes)), axis, q.shape[0], (q.shape[2], k.shape[2])
        )
        spec = PartitionSpec(batch_part, axis, heads_part)
        bias_specs = tuple(
            PartitionSpec(batch_part if b.shape[0] == batch else None, axis) for b in biases
        )
        id_specs = (PartitionSpec(batch_part, axis),) * len(ids)
        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec, spec) + bias_specs + id_specs,
            out_specs=spec,
            axis_names=spec_axes(axis, batch_part, heads_part),
            check_vma=False,
        )
        with jax.named_scope(SCOPE):  # names the collectives in compiled HLO metadata
            o = sharded(q, k, v, *biases, *ids)
        return o, None

    return parallel_op
