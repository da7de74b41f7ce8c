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

Documents packed in a row (``segment_ids``): each document gets its own segment grid
from its first token, the memory restarts from its initial weights, and the attention
stays within the document. The row is laid out into slots of ``C`` tokens as for the
neural memory (:mod:`xformjax.ops.neural_memory.layout`: a long document on whole
slots of its own, short ones sharing a slot), each slot runs as one segment — masked
to its documents, RoPE at each token's in-document position mod ``C`` — and the
outputs are gathered back; a slot past every row's last token is skipped
(``lax.cond`` in the scan's step), so a batch costs about the slots it uses.
``document_tokens`` in the state counts the last document's tokens, so decoding
continues it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import merge_heads, position_of, split_heads
from xformjax.nn.neural_memory import (
    MemoryOpState,
    after_buffer,
    open_chunk,
    select_rows,
    token_by_token,
)
from xformjax.nn.norms import l2_normalize
from xformjax.nn.packing import Packing, derived_positions
from xformjax.nn.positional import apply_rope
from xformjax.nn.sliding_attention import masked_attention, with_persistent
from xformjax.nn.states import ConvCaches, SegmentTokens, TitansMACState
from xformjax.nn.streams import silu_stream
from xformjax.nn.titans.branches import AttentionTitans
from xformjax.ops.common.validation import Mode
from xformjax.ops.neural_memory.layout import document_layout, gather, scatter, used_rows


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
            document_tokens=jnp.zeros((batch,), jnp.int32),
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
        self,
        x: jax.Array,
        caches: ConvCaches | None,
        counted: jax.Array,
        packing: Packing | None = None,
    ) -> tuple[SegmentTokens, ConvCaches]:
        """Per new token: the retrieval query (conv, SiLU, L2 norm) and the attention
        q, k, v with RoPE at the in-segment position (the token's index in its document
        mod ``C``; ``counted`` ``[B]``: the continued document's tokens so far)."""
        config, dtype = self.config, self.state_dtype()
        query, conv_q = silu_stream(
            self.projections["q"],
            self.convs.get("q"),
            x,
            None if caches is None else caches.q,
            packing,
        )
        query = l2_normalize(split_heads(query, config.num_heads))
        offsets = in_segment_positions(counted, x.shape[1], config.chunk_size, packing)
        qa, ka, va = self.attention(x, offsets)
        tokens = SegmentTokens(q=query, qa=qa, ka=ka, va=va)
        return jax.tree.map(lambda a: a.astype(dtype), tokens), ConvCaches(q=conv_q)

    def one_segment(
        self,
        memory: MemoryOpState,
        tokens: SegmentTokens,
        offsets: jax.Array | None = None,
        resets: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, MemoryOpState]:
        """One segment ``[B, C, …]`` from the memory at its start: retrieval, attention
        over [persistent, h, tokens], memory update with y; → (attention out, memory
        out, memory at the segment end). With documents laid out in the segment
        (``resets`` ``[B, C]``, from the initial memory when its first row is reset;
        ``offsets`` ``[B, C]``, each row's in-segment position): attention only within
        a document, the memory restarting at each."""
        config, dtype = self.config, self.state_dtype()
        size = config.chunk_size
        depth = len(self.memory)
        if resets is not None:
            memory = select_rows(resets[:, 0], self.init_memory(resets.shape[0]), memory)
        weights = [memory[f"weight_{i}"] for i in range(depth)]
        h = tokens.q
        for index, w in enumerate(weights):  # h = M_{W_s}(q)
            h = jnp.einsum("bchd,bhde->bche", h, w)
            if index < depth - 1:
                h = jax.nn.silu(h)
        context = self.context_proj(merge_heads(h).astype(config.compute_dtype))
        positions = jnp.arange(size) if offsets is None else offsets
        _, kh, vh = self.attention(context, positions, rope=False)
        kh = apply_rope(kh, positions, base=config.rope_theta)
        persistent_k, persistent_v = self.attention.persistent_kv(dtype)
        keys = jnp.concatenate([kh.astype(dtype), tokens.ka], 1)
        values = jnp.concatenate([vh.astype(dtype), tokens.va], 1)
        keys, values, count = with_persistent(
            keys, values, persistent_k, persistent_v, (keys.shape[0],)
        )
        causal = jnp.tril(jnp.ones((size, size), bool))[None]
        if resets is not None:  # and within one document
            document = jnp.cumsum(resets.astype(jnp.int32), axis=1)
            causal = causal & (document[:, :, None] == document[:, None, :])
        visible = jnp.ones((causal.shape[0], size, count), bool)
        mask = jnp.concatenate([visible, causal, causal], 2)[:, None]  # [B|1, 1, C, ·]
        attended = masked_attention(tokens.qa, keys, values, mask)  # [B, C, H, V]
        y = self.summary_proj(merge_heads(attended).astype(config.compute_dtype))
        q, memory_tokens, _ = self.memory_streams(y, {}, None)  # no conv on y
        read, new_memory = self.memory_op(q, memory_tokens, memory, resets=resets)
        return attended, read, new_memory

    def run_segments(
        self,
        tokens: SegmentTokens,
        memory: MemoryOpState,
        segment: SegmentTokens,
        counted: jax.Array,
        starts: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, MemoryOpState, SegmentTokens, jax.Array]:
        """The segments from the last boundary, the open segment's tokens in front
        (``counted`` ``[B]``: the current document's tokens so far; ``starts``
        ``[B, T]``: documents packed in the rows, laid out on their own segment grids
        by :mod:`xformjax.ops.neural_memory.layout`); → (attention out, memory out,
        memory at the last boundary, open segment, counted) of each row's last
        document."""
        chunk = self.config.chunk_size
        batch, length = tokens.q.shape[:2]
        count = counted % chunk
        total = count + length
        size = chunk + length
        place = jax.vmap(lambda old, new, n: after_buffer(old[None], new[None], n, size)[0])
        combined = jax.tree.map(lambda old, new: place(old, new, count), segment, tokens)
        used = None  # packed: the buffer rows in use; later segments are skipped
        if starts is None:
            segments = -(-size // chunk)
            rows = segments * chunk
            laid = jax.tree.map(
                lambda a: jnp.pad(a, ((0, 0), (0, rows - size)) + ((0, 0),) * (a.ndim - 2)),
                combined,
            )
            boundary = total // chunk * chunk
            resets = offsets = None
            fresh = jnp.zeros((batch,), bool)
            layout = None
        else:
            combined_starts = place(jnp.zeros((batch, chunk), bool), starts, count)
            valid = jnp.arange(size)[None, :] < total[:, None]
            layout = document_layout(combined_starts, valid, chunk, continuing=True)
            laid = jax.tree.map(lambda a: scatter(a, layout), combined)
            rows = laid.q.shape[1]
            segments = rows // chunk
            resets = layout.resets
            # a row's in-segment position: its offset from its document's first row
            document = jnp.cumsum(combined_starts.astype(jnp.int32), axis=1)
            first = jax.lax.cummax(jnp.where(combined_starts, jnp.arange(size)[None, :], 0), axis=1)
            in_document = jnp.where(
                document == 0, jnp.arange(size)[None, :], jnp.arange(size) - first
            )
            offsets = scatter(in_document % chunk, layout)
            boundary = layout.boundary
            fresh = layout.fresh
            used = used_rows(layout, chunk)

        def split(a):  # [B, S·C, …] -> [S, B, C, …]
            return jnp.moveaxis(a.reshape((a.shape[0], segments, chunk) + a.shape[2:]), 1, 0)

        extras = () if resets is None else (split(offsets), split(resets))

        def step(carry, xs):
            memory, chosen, end = carry
            xs, extra = xs
            run = lambda: self.one_segment(memory, xs, *extra)
            if used is None:
                attended, read, new_memory = run()
            else:  # a segment past every row's documents holds no token: skip it
                shapes = jax.eval_shape(run)
                skip = lambda: (*(jnp.zeros(a.shape, a.dtype) for a in shapes[:2]), memory)
                attended, read, new_memory = jax.lax.cond(end < used, run, skip)
            end = end + chunk
            chosen = select_rows(end == boundary, new_memory, chosen)
            return (new_memory, chosen, end), (attended, read)

        (_, chosen, _), (attended, read) = jax.lax.scan(
            jax.checkpoint(step),
            (memory, memory, jnp.zeros((), jnp.int32)),
            (jax.tree.map(split, laid), extras),
        )
        chosen = select_rows(fresh, self.init_memory(batch), chosen)

        def unsegment(a):  # [S, B, C, H, V] -> the new tokens' rows [B, T, H, V]
            a = jnp.moveaxis(a, 0, 1).reshape((a.shape[1], segments * chunk) + a.shape[3:])
            if layout is not None:
                a = gather(a, layout)
            return jax.vmap(lambda r, n: jax.lax.dynamic_slice_in_dim(r, n, length, 0))(a, count)

        if layout is None:
            start, counted = boundary, counted + length
        else:
            start = total - layout.open_tokens
            assert starts is not None  # a layout comes from them
            begun = jnp.any(starts, axis=1)
            counted = jnp.where(begun, layout.document_tokens, counted + length)
        keep = jax.vmap(lambda a, b, n: open_chunk(a[None], b, n, chunk)[0])
        segment = jax.tree.map(lambda a: keep(a, start, total - start), combined)
        return unsegment(attended), unsegment(read), chosen, segment, counted

    def __call__(
        self,
        x: jax.Array,
        *,
        state: TitansMACState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, TitansMACState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``; ``segment_ids``,
        ``positions`` ``[B, T]``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        batch, length, _ = x.shape
        mode = self.resolve_mode(mode, length)
        packing = self.packing(x, state, segment_ids, positions)
        position = position_of(state)
        if state is None:
            conv_caches = None
            state = self.init_state(batch)
        else:
            conv_caches = state.conv
        tokens, conv = self.segment_streams(x, conv_caches, state.document_tokens, packing)
        starts = None if packing is None else packing.starts
        if mode == "recurrent" and length > 1:
            initial = self.init_memory(batch)

            def run(token, carry, pos):
                del pos
                (token, start), (memory, segment, counted) = token, carry
                if start is not None:  # a document begins: the memory starts afresh
                    memory = select_rows(start[:, 0], initial, memory)
                    counted = jnp.where(start[:, 0], 0, counted)
                attended, read, memory, segment, counted = self.run_segments(
                    token, memory, segment, counted
                )
                return (attended, read), (memory, segment, counted)

            (attended, read), (memory, segment, counted) = token_by_token(
                run,
                (tokens, starts),
                (state.memory, state.segment, state.document_tokens),
                position,
            )
        else:
            attended, read, memory, segment, counted = self.run_segments(
                tokens, state.memory, state.segment, state.document_tokens, starts
            )
        y = self.head(attended, read, x.dtype)
        return y, TitansMACState(
            position=position + length,
            memory=memory,
            segment=segment,
            conv=conv,
            document_tokens=counted,
        )


def in_segment_positions(
    counted: jax.Array, length: int, chunk: int, packing: Packing | None
) -> jax.Array:
    """``[B, T]``: each new token's index in its document mod ``C`` (the document the
    call continues has ``counted`` ``[B]`` tokens before it)."""
    continued = counted[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    if packing is None:
        return continued % chunk
    own = derived_positions(packing.segment_ids)
    return jnp.where(packing.document_index == 0, continued, own) % chunk
