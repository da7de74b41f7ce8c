"""Softmax and sigmoid attention layers with RoPE, grouped-query heads, an optional
sliding window and a fixed-capacity KV cache as their state.

    q, k, v = RoPE(x W_q), RoPE(x W_k), x W_v         (Hq query heads, Hkv kv heads)
    o_i     = Σ_{j ≤ i, i − j < window} w_ij v_j
    w_ij    = softmax_j(q_i·k_j / √D)                  (``attn``: "Attention Is All You Need")
            = σ(q_i·k_j / √D + b_i), b_i = 1 − log n_i (``sigmoid_attn``: "Theory, Analysis,
                                                        and Best Practices for Sigmoid
                                                        Self-Attention", Ramapuram et al. 2024)
    y       = W_o · merge(o)

State: a :class:`~xformjax.nn.states.KVCacheState`, ``k``, ``v`` ``[B, L, Hkv, D]``
with the first ``position`` slots filled, and ``segment_ids`` ``[B, L]``, the document
of every cached key. ``init_state(batch, max_len)`` allocates ``L = max_len``
(``config.max_seq_len`` if ``None``); a stateless call returns a cache of capacity
``max(T, config.max_seq_len)`` holding its T tokens. Writing past the capacity raises
a ``ValueError`` when the position is concrete, and gives NaN outputs inside ``jit``
(never silently wrong values). The cache keeps every position even with a
``window`` (the window is applied by masking). Under an active mesh whose ``seq``
axis (> 1) divides T, a fresh sequence runs with LASP-2H
(:mod:`xformjax.parallel.lasp2h`). Sigmoid attention's bias is
``config.sigmoid_bias`` when set; by default it is per query,
``b_i = 1 − log n_i`` with ``n_i`` the keys query ``i`` sees (``min(i + 1, window)``).
It depends only on the query's position, so decoding and training agree; the
attention mass at initialisation, ``n_i σ(b_i) ≈ e``, stays bounded at any length
(the purpose of the paper's ``−log n``). The ``+1`` matters at small scale: with
``b_i = −log n_i`` (or any constant bias of −2 or below), two sigmoid layers stay
at chance on 4-pair MQAR after 400–1000 steps; with ``1 − log n_i`` they reach
99.4–100 % in 400 (``tests/models/test_attention_learning.py``).

Packed documents (``segment_ids``, ``positions`` ``[B, T]``; :mod:`xformjax.nn.packing`):
RoPE rotates by ``positions``, the sigmoid bias counts ``n_i = positions + 1`` (capped
by the window), and a query attends only to keys of its own document — the op's
``segment_ids``, the call's document index (:attr:`~xformjax.nn.packing.Packing.
document_index`). The window is measured in key slots, which within a document are
its positions. The cache remembers each key's document as an absolute count:
``segment_ids[b, j]`` is the number of documents begun in row ``b`` (since the cache
was empty) up to key ``j``. A call continues the document of the last cached key (its
tokens before the first beginning get that id, later ones +1 per beginning), so a
document split over several calls — left-padded prompts: padding id 0, the prompt
id 1, decoding with ``segment_ids`` of 1 or none — never sees the keys of another.
Decoding such a row token by token needs ``positions`` (the state's ``position``
counts the padding too).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.core import Tracer

from xformjax import ops
from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import Mixer, merge_heads, position_of, register, split_heads
from xformjax.nn.packing import Packing, token_positions_of
from xformjax.nn.positional import apply_rope
from xformjax.nn.recurrent import sequence_mesh
from xformjax.nn.states import KVCacheState
from xformjax.ops.common.validation import Mode


@register("attn")
class Attention(Mixer):
    """Causal softmax attention (RoPE, grouped-query heads, optional sliding window)."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")
    kind: ClassVar[str] = "softmax"

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        if config.key_dim % 2:
            raise ValueError(f"attention needs an even head_dim for RoPE; got {config.key_dim}")
        d, dim = config.d_model, config.key_dim
        self.q_proj = linear.dense(
            config, d, config.num_heads * dim, axes=("embed", "heads"), rngs=rngs
        )
        self.k_proj = linear.dense(
            config, d, config.kv_heads * dim, axes=("embed", "kv"), rngs=rngs
        )
        self.v_proj = linear.dense(
            config, d, config.kv_heads * dim, axes=("embed", "kv"), rngs=rngs
        )
        self.o_proj = linear.dense(
            config, config.num_heads * dim, d, axes=("heads", "embed"), rngs=rngs
        )

    def _bias(self, positions: jax.Array) -> float | jax.Array | None:
        """Sigmoid attention's bias for queries at ``positions`` ``[T]`` or ``[B, T]``
        (softmax: none)."""
        del positions
        return None

    def sequence_flops(self, seq_len: int) -> float:
        """``q·k`` and ``w·v`` against the visible keys (on average ``(T+1)/2``, or
        the window)."""
        visible = (seq_len + 1) / 2
        if self.config.window is not None:
            visible = min(visible, self.config.window)
        return 4.0 * self.config.num_heads * self.config.key_dim * visible

    def init_state(self, batch: int, max_len: int | None = None) -> KVCacheState:
        capacity = self.config.max_seq_len if max_len is None else max_len
        shape = (batch, capacity, self.config.kv_heads, self.config.key_dim)
        zeros = jnp.zeros(shape, self.config.compute_dtype)
        return KVCacheState(
            k=zeros,
            v=zeros,
            position=jnp.zeros((), jnp.int32),
            segment_ids=jnp.zeros((batch, capacity), jnp.int32),
        )

    def _attend(self, q, k, v, positions, **kwargs):
        fn = ops.softmax_attention if self.kind == "softmax" else ops.sigmoid_attention
        mesh = sequence_mesh(q.shape[1]) if "kv_length" not in kwargs else None
        if mesh is not None:  # a fresh sequence split over the active mesh's seq axis
            from xformjax.parallel import sequence_parallel

            fn = sequence_parallel(fn, mesh, "seq")
        extra = {} if self.kind == "softmax" else {"bias": self._bias(positions)}
        o, _ = fn(
            q, k, v, window=self.config.window, chunk_size=self.config.chunk_size, **extra, **kwargs
        )
        return o

    def __call__(
        self,
        x: jax.Array,
        *,
        state: KVCacheState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCacheState]:
        """``x`` ``[B, T, d_model]`` → ``(y, state)``; see the module docstring."""
        self.check_input(x)
        batch, length = x.shape[:2]
        mode = self.resolve_mode(mode, length)
        packing = self.packing(x, state, segment_ids, positions)
        position = position_of(state)
        positions = token_positions_of(packing, position, length)
        theta = self.config.rope_theta
        q = apply_rope(split_heads(self.q_proj(x), self.config.num_heads), positions, base=theta)
        k = apply_rope(split_heads(self.k_proj(x), self.config.kv_heads), positions, base=theta)
        v = split_heads(self.v_proj(x), self.config.kv_heads)
        if state is None:
            documents = None if packing is None else packing.document_index
            o = self._attend(q, k, v, positions, mode=mode, segment_ids=documents)
            capacity = max(length, self.config.max_seq_len)
            pad = ((0, 0), (0, capacity - length), (0, 0), (0, 0))
            cached_documents = (
                jnp.zeros((batch, capacity), jnp.int32)
                if documents is None
                else jnp.pad(documents, ((0, 0), (0, capacity - length)))
            )
            new_state = KVCacheState(
                k=jnp.pad(k, pad),
                v=jnp.pad(v, pad),
                position=position + length,
                segment_ids=cached_documents,
            )
        else:
            capacity = state.k.shape[1]
            if not isinstance(position, Tracer) and int(position) + length > capacity:
                raise ValueError(
                    f"{type(self).__name__}: the KV cache holds {capacity} tokens; "
                    f"{int(position)} are used and {length} more were given. "
                    "Allocate it with init_state(batch, max_len) large enough."
                )
            cache_k = jax.lax.dynamic_update_slice_in_dim(
                state.k, k.astype(state.k.dtype), position, axis=1
            )
            cache_v = jax.lax.dynamic_update_slice_in_dim(
                state.v, v.astype(state.v.dtype), position, axis=1
            )
            cache_documents = jax.lax.dynamic_update_slice_in_dim(
                _cached_documents(state),
                _call_documents(state, packing, batch, length),
                position,
                axis=1,
            )
            cache_mode = "recurrent" if mode == "recurrent" else "parallel"
            o = self._attend(
                q,
                cache_k,
                cache_v,
                positions,
                mode=cache_mode,
                kv_length=position + length,
                segment_ids=cache_documents,
            )
            # Under jit the overflow is not visible above; never return silently wrong
            # values from a full cache: poison them.
            o = jnp.where(position + length > capacity, jnp.nan, o)
            new_state = KVCacheState(
                k=cache_k, v=cache_v, position=position + length, segment_ids=cache_documents
            )
        return self.o_proj(merge_heads(o).astype(x.dtype)), new_state


def _cached_documents(state: KVCacheState) -> jax.Array:
    """The cache's document ids ``[B, L]`` (zeros for a state built without them)."""
    if state.segment_ids is None:
        return jnp.zeros(state.k.shape[:2], jnp.int32)
    return state.segment_ids


def _call_documents(
    state: KVCacheState, packing: Packing | None, batch: int, length: int
) -> jax.Array:
    """``[B, T]`` document ids of a call's tokens in the cache's numbering: the last
    cached key's document (0 for an empty cache), plus the documents begun in the call."""
    documents = _cached_documents(state)
    last = jnp.maximum(state.position - 1, 0)
    current = jax.lax.dynamic_slice_in_dim(documents, last, 1, axis=1)  # [B, 1]
    begun = jnp.zeros((batch, length), jnp.int32) if packing is None else packing.document_index
    return current + begun


@register("sigmoid_attn")
class SigmoidAttention(Attention):
    """Causal sigmoid attention, ``σ(q_i·k_j/√D + b_i)``: ``b_i = config.sigmoid_bias``,
    or ``1 − log n_i`` by default (the module docstring)."""

    kind: ClassVar[str] = "sigmoid"

    def _bias(self, positions: jax.Array) -> float | jax.Array:
        """``config.sigmoid_bias``, or per query ``1 − log n_i`` (module docstring)."""
        if self.config.sigmoid_bias is not None:
            return self.config.sigmoid_bias
        visible = positions + 1
        if self.config.window is not None:
            visible = jnp.minimum(visible, self.config.window)
        return 1.0 - jnp.log(
            visible.astype(jnp.promote_types(self.config.compute_dtype, jnp.float32))
        )
