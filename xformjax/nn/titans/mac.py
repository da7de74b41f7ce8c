"""Titans MAC (memory as context): per segment, attention over the memory's read-out
and the tokens; the memory learns from the attention's output.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025. Per segment ``s``
of ``C = chunk_size`` tokens with the memory ``W_s`` at its start:

    h_t = M_{W_s}(q_t)                        (q_t: MAL's query stream of x; read only)
    c_t = merge(h_t) W_c;  k^h_t, v^h_t = RoPE(c_t W_k^a), c_t W_v^a
    a_t = attention of q^a_t over [k^p, v^p] ∪ {h_j : j ≤ t} ∪ {x_j : j ≤ t}, j in segment s
    ỹ_t = merge(a_t) W_y;  q, k, v, θ, η, α of the memory are computed from ỹ (no conv)
    W_{s+1}: the memory's chunk update with the segment's (k, v) from ỹ
    o_t = M_{W_t}(q_t(ỹ_t))                   (per-token weights inside the segment)
    y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))

following the paper (``h = M*_{t-1}(q)``, ``ỹ = Attn([p, h, S])``, ``M_t = M_{t-1}(ỹ)``,
``o = ỹ ⊗ M*_t(ỹ)``) with the same ``⊗`` as MAG
(:class:`~xformjax.nn.titans.branches.GatedReadout`). The attention is confined to
the segment (RoPE at the in-segment position); the h tokens are mapped to width
``d_model`` by ``W_c`` and share the attention's key/value projections. Segments
run one after the other (``lax.scan``, linear in ``T``). The state
(:class:`~xformjax.nn.states.TitansMACState`) keeps the memory at the last segment
boundary and the segment's tokens so far (``segment.q``, ``segment.qa/ka/va``
``[B, C, H, ·]``); a call recomputes the open segment from the boundary, so decoding
equals the full forward exactly. Only the retrieval query has a short convolution
(``conv.q``).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import merge_heads, position_of, split_heads
from xformjax.nn.neural_memory import MemoryOpState, after_buffer, open_chunk, token_by_token
from xformjax.nn.norms import l2_normalize
from xformjax.nn.positional import apply_rope, token_positions
from xformjax.nn.sliding_attention import masked_attention, with_persistent
from xformjax.nn.states import ConvCaches, SegmentTokens, TitansMACState
from xformjax.nn.streams import silu_stream
from xformjax.nn.titans.branches import AttentionTitans
from xformjax.ops.common.validation import Mode


class TitansMAC(AttentionTitans):
    """Titans, memory as context (``titans_variant="mac"``; module docstring)."""

    variant = "mac"

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        width = config.num_heads * config.value_dim
        # h (memory read-out) → a token of width d_model; attention output → y
        self.context_proj = linear.dense(
            config, width, config.d_model, axes=("heads", "embed"), rngs=rngs
        )
        self.summary_proj = linear.dense(
            config, width, config.d_model, axes=("heads", "embed"), rngs=rngs
        )

    def conv_streams(self, config: MixerConfig) -> tuple[str, ...]:
        # only the retrieval query comes from x; k, v are computed from y
        return ("q",)

    def init_state(self, batch: int, max_len: int | None = None) -> TitansMACState:
        del max_len  # neither the memory nor the segment grows with the sequence
        config, dtype = self.config, self.state_dtype()
        shape = (batch, config.chunk_size, config.num_heads)
        keys = jnp.zeros(shape + (config.key_dim,), dtype)
        segment = SegmentTokens(
            q=keys, qa=keys, ka=keys, va=jnp.zeros(shape + (config.value_dim,), dtype)
        )
        return TitansMACState(
            position=jnp.zeros((), jnp.int32),
            memory=self.init_memory(batch),
            segment=segment,
            conv=self.init_conv(batch),
        )

    def sequence_flops(self, seq_len: int) -> float:
        """The memory's, plus the read ``h`` and the segment's ``P + 2C`` keys
        (recomputed per call)."""
        config = self.config
        dims = self.memory_dims()
        keys = config.persistent_tokens + 2 * config.chunk_size
        return (
            super().sequence_flops(seq_len)
            + 2.0 * config.num_heads * sum(a * b for a, b in itertools.pairwise(dims))
            + 2.0 * config.num_heads * keys * (config.key_dim + config.value_dim)
        )

    def segment_streams(
        self, x: jax.Array, caches: ConvCaches | None, position: jax.Array
    ) -> tuple[SegmentTokens, ConvCaches]:
        """Per new token: the retrieval query (conv, SiLU, L2 norm) and the attention
        q, k, v with RoPE at the in-segment position ``(position + t) mod C``."""
        config, dtype = self.config, self.state_dtype()
        query, conv_q = silu_stream(
            self.projections["q"], self.convs.get("q"), x, None if caches is None else caches.q
        )
        query = l2_normalize(split_heads(query, config.num_heads))
        offsets = token_positions(position, x.shape[1]) % config.chunk_size
        qa, ka, va = self.attention(x, offsets)
        tokens = SegmentTokens(q=query, qa=qa, ka=ka, va=va)
        return jax.tree.map(lambda a: a.astype(dtype), tokens), ConvCaches(q=conv_q)

    def one_segment(
        self, memory: MemoryOpState, tokens: SegmentTokens
    ) -> tuple[jax.Array, jax.Array, MemoryOpState]:
        """One segment ``[B, C, …]`` from the memory at its start: retrieval, attention
        over [persistent, h, tokens], memory update with y; → (attention out, memory
        out, memory at the segment end)."""
        config, dtype = self.config, self.state_dtype()
        size = config.chunk_size
        depth = len(self.memory)
        weights = [memory[f"weight_{i}"] for i in range(depth)]
        h = tokens.q
        for index, w in enumerate(weights):  # h = M_{W_s}(q)
            h = jnp.einsum("bchd,bhde->bche", h, w)
            if index < depth - 1:
                h = jax.nn.silu(h)
        context = self.context_proj(merge_heads(h).astype(config.compute_dtype))
        _, kh, vh = self.attention(context, jnp.arange(size), rope=False)
        kh = apply_rope(kh, jnp.arange(size), base=config.rope_theta)
        persistent_k, persistent_v = self.attention.persistent_kv(dtype)
        keys = jnp.concatenate([kh.astype(dtype), tokens.ka], 1)
        values = jnp.concatenate([vh.astype(dtype), tokens.va], 1)
        keys, values, count = with_persistent(
            keys, values, persistent_k, persistent_v, (keys.shape[0],)
        )
        causal = jnp.tril(jnp.ones((size, size), bool))
        mask = jnp.concatenate([jnp.ones((size, count), bool), causal, causal], 1)
        attended = masked_attention(tokens.qa, keys, values, mask)  # [B, C, H, V]
        y = self.summary_proj(merge_heads(attended).astype(config.compute_dtype))
        q, memory_tokens, _ = self.memory_streams(y, {}, None)  # no conv on y
        read, new_memory = self.memory_op(q, memory_tokens, memory)
        return attended, read, new_memory

    def run_segments(
        self,
        tokens: SegmentTokens,
        memory: MemoryOpState,
        segment: SegmentTokens,
        position: jax.Array,
    ) -> tuple[jax.Array, jax.Array, MemoryOpState, SegmentTokens]:
        """The segments from the last boundary, the open segment's tokens in front;
        → (attention out, memory out, memory at the last boundary, open segment)."""
        chunk = self.config.chunk_size
        length = tokens.q.shape[1]
        count = position % chunk
        total = count + length
        segments = -(-(chunk + length) // chunk)
        combined = jax.tree.map(
            lambda old, new: after_buffer(old, new, count, segments * chunk), segment, tokens
        )

        def step(carry, xs):
            memory, end = carry
            attended, read, new_memory = self.one_segment(memory, xs)
            end = end + chunk
            memory = jax.tree.map(lambda a, b: jnp.where(end <= total, a, b), new_memory, memory)
            return (memory, end), (attended, read)

        per_segment = jax.tree.map(
            lambda a: jnp.moveaxis(a.reshape((a.shape[0], segments, chunk) + a.shape[2:]), 1, 0),
            combined,
        )
        (memory, _), (attended, read) = jax.lax.scan(
            jax.checkpoint(step), (memory, jnp.zeros((), jnp.int32)), per_segment
        )

        def unsegment(a):  # [S, B, C, H, V] -> the new tokens' rows [B, T, H, V]
            a = jnp.moveaxis(a, 0, 1).reshape((a.shape[1], segments * chunk) + a.shape[3:])
            return jax.lax.dynamic_slice_in_dim(a, count, length, axis=1)

        start = (total // chunk) * chunk
        segment = jax.tree.map(lambda a: open_chunk(a, start, total - start, chunk), combined)
        return unsegment(attended), unsegment(read), memory, segment

    def __call__(
        self, x: jax.Array, *, state: TitansMACState | None = None, mode: Mode | None = None
    ) -> tuple[jax.Array, TitansMACState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``."""
        self.check_input(x)
        batch, length, _ = x.shape
        mode = self.resolve_mode(mode, length)
        position = position_of(state)
        tokens, conv = self.segment_streams(x, None if state is None else state.conv, position)
        if state is None:
            state = self.init_state(batch)
        if mode == "recurrent" and length > 1:

            def run(token, carry, pos):
                memory, segment = carry
                attended, read, memory, segment = self.run_segments(token, memory, segment, pos)
                return (attended, read), (memory, segment)

            (attended, read), (memory, segment) = token_by_token(
                run, tokens, (state.memory, state.segment), position
            )
        else:
            attended, read, memory, segment = self.run_segments(
                tokens, state.memory, state.segment, position
            )
        y = self.head(attended, read, x.dtype)
        return y, TitansMACState(
            position=position + length, memory=memory, segment=segment, conv=conv
        )
