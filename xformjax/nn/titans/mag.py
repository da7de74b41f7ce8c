"""Titans MAG (memory as a gate): sliding-window attention gated by the memory.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025. ``P =
persistent_tokens`` learned tokens ``p_1 … p_P`` (``[P, d_model]``) are put before
the sequence for the attention branch only; the memory branch is exactly MAL's
memory on ``x`` (:mod:`xformjax.nn.neural_memory`):

    q^a, k^a, v^a = RoPE(x W_q^a), RoPE(x W_k^a), x W_v^a;  k^p, v^p = p W_k^a, p W_v^a
    a_t = Σ_{j ∈ persistent ∪ [t−W+1, t]} softmax_j(q^a_t · k_j / √K) v_j    (W = memory_window)
    o_t = M_{W_t}(q_t)                                     (the memory read, as in MAL)
    y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))   (per head; both norms learned)

This is the paper's ``o = y ⊗ M(x̃)`` with its stated choice for ``⊗``
(:class:`~xformjax.nn.titans.branches.GatedReadout`). The memory branch reads ``x``
only (the persistent tokens do not write into it). The attention is computed
blockwise (:mod:`xformjax.nn.sliding_attention`, ``O(T·(P + W))``). The state
(:class:`~xformjax.nn.states.TitansMAGState`) is MAL's plus ``attn_k`` /
``attn_v`` ``[B, W−1, H, ·]``, the last ``W − 1`` (RoPE'd) keys/values.

Documents packed in a row (``segment_ids``): the memory branch restarts each document
on its own chunk grid from the initial memory (as MAL), the window keeps to the query's
document (keys of other documents are masked; the persistent tokens stay visible to
every query, as alone) and RoPE rotates by the in-document ``positions``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.nn.mixer import position_of
from xformjax.nn.packing import token_positions_of
from xformjax.nn.sliding_attention import sliding_window_attention
from xformjax.nn.states import TitansMAGState
from xformjax.nn.titans.branches import AttentionTitans
from xformjax.ops.common.validation import Mode


class TitansMAG(AttentionTitans):
    """Titans, memory as a gate (``titans_variant="mag"``; module docstring)."""

    variant = "mag"

    def init_state(self, batch: int, max_len: int | None = None) -> TitansMAGState:
        del max_len  # neither the memory nor the window grows with the sequence
        config, dtype = self.config, self.state_dtype()
        span = (batch, config.memory_window - 1, config.num_heads)
        return TitansMAGState(
            position=jnp.zeros((), jnp.int32),
            memory=self.init_memory(batch),
            buffer=self.init_buffer(batch),
            conv=self.init_conv(batch),
            attn_k=jnp.zeros(span + (config.key_dim,), dtype),
            attn_v=jnp.zeros(span + (config.value_dim,), dtype),
            document_tokens=jnp.zeros((batch,), jnp.int32),
        )

    def sequence_flops(self, seq_len: int) -> float:
        """The memory's, plus the blockwise window: ``P + 2W`` scores and values per
        query."""
        config = self.config
        keys = config.persistent_tokens + 2 * config.memory_window
        return super().sequence_flops(seq_len) + 2.0 * config.num_heads * keys * (
            config.key_dim + config.value_dim
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        state: TitansMAGState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, TitansMAGState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``; ``segment_ids``,
        ``positions`` ``[B, T]``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        batch, length, _ = x.shape
        mode = self.resolve_mode(mode, length)
        packing = self.packing(x, state, segment_ids, positions)
        position = position_of(state)
        memory_out, memory, buffer, counted, conv = self.memory_branch(x, state, mode, packing)
        q, k, v = self.attention(x, token_positions_of(packing, position, length))
        window = self.config.memory_window
        documents = cache_documents = None
        if state is None:
            state = self.init_state(batch)
        elif packing is None:
            documents = jnp.zeros((batch, length), jnp.int32)
        if packing is not None:
            documents = packing.document_index
        if documents is not None:
            # the cache's last min(document_tokens, W − 1) rows belong to the document
            # the call continues (index 0); the others to none (−1)
            rows = jnp.arange(window - 1)[None, :]
            kept = jnp.minimum(state.document_tokens, window - 1)[:, None]
            cache_documents = jnp.where(rows >= window - 1 - kept, 0, -1)
        cached = jnp.minimum(position, window - 1)
        dtype = self.state_dtype()
        persistent_k, persistent_v = self.attention.persistent_kv(dtype)
        attended, cache_k, cache_v = sliding_window_attention(
            q,
            k,
            v,
            window=window,
            cache_k=state.attn_k,
            cache_v=state.attn_v,
            cached=cached,
            persistent_k=persistent_k,
            persistent_v=persistent_v,
            segment_ids=documents,
            cache_segment_ids=cache_documents,
        )
        y = self.head(attended, memory_out, x.dtype)
        return y, TitansMAGState(
            position=position + length,
            memory=memory,
            buffer=buffer,
            conv=conv,
            attn_k=cache_k.astype(dtype),
            attn_v=cache_v.astype(dtype),
            document_tokens=counted,
        )
