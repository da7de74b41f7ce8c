"""The neural-memory mixer: a per-head MLP memory trained at test time.

The machinery Titans' three variants (:mod:`xformjax.nn.titans`) and ATLAS
(:mod:`xformjax.nn.atlas`) share, from "Titans: Learning to Memorize at Test Time",
Behrouz et al. 2025. As a layer of its own it is Titans' memory as a layer (MAL):

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))   (short causal conv)
    q, k   ← φ(q/‖q‖), φ(k/‖k‖)  (per head; φ = identity but in ATLAS)
    θ_t = σ(x_t W_θ + b_θ),  η_t = σ(x_t W_η + b_η),  α_t = σ(x_t W_α + b_α)   (per head;
          b_θ starts at −3 so the inner learning rate starts near 0.05)
    u_t = ∇_W ½‖M_{W_{t-1}}(k_t) − v_t‖²
    m_t = η_t m_{t-1} − θ_t u_t ;   W_t = (1 − α_t) W_{t-1} + m_t
    o_t = M_{W_t}(q_t);   y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

``M_W`` is an MLP of ``config.memory_depth`` layers (hidden width
``memory_expansion · head_dim``, SiLU between layers, no biases; depth 1 is a
linear memory); its initial weights are parameters of the layer. The op is
:func:`xformjax.ops.neural_memory.neural_memory`; :meth:`NeuralMemoryMixer.memory_op`
is the one place a layer calls it.

Training uses the paper's chunked form: inside a chunk of ``config.chunk_size``
tokens every gradient is taken at the chunk-start weights — with ``C > 1`` this is
the paper's approximation of the token-by-token rule above, and the layer computes
exactly that approximation in every mode. Decoding reproduces it exactly: the
state keeps the memory (weights, momentum) at the last chunk boundary (absolute
position a multiple of ``C``) and a fixed ``[B, C, …]`` buffer of the tokens since
(``position mod C`` of them). A call puts the buffered tokens before its new
tokens, runs the chunk form from the boundary state, drops the buffered tokens'
outputs and keeps the new boundary state and buffer. ``mode="recurrent"`` feeds
the tokens one at a time this way (the op's own ``mode="recurrent"`` is the exact
token-by-token rule, which this layer does not use).

State: a :class:`~xformjax.nn.states.NeuralMemoryState` — ``memory`` (the op's
state at the chunk boundary: ``weight_l``, ``momentum_l`` ``[B, H, d_{l-1}, d_l]``),
``buffer`` (the :class:`~xformjax.nn.states.MemoryTokens` k, v, θ, η, α, γ of the
buffered tokens, ``[B, C, H, ·]``, zero beyond the count), ``conv`` (the
convolutions' caches), ``document_tokens`` ``[B]`` (the current document's tokens so
far: the buffer holds ``document_tokens mod C``) and ``position``.

Documents packed in a row (``segment_ids``, :mod:`xformjax.nn.packing`): a document
alone has its chunks begin at its first token, so exact isolation needs the chunk grid
to restart with every document, and the memory (the learned initial weights, zero
momentum, an empty Omega window) with it. Two ways were possible: a token-by-token
scan that flushes the buffer at each start (exact but ``C``× more steps, each a whole
chunk step), or re-laying the row out so every document begins on a chunk boundary.
The chunk form uses the second (:mod:`xformjax.ops.neural_memory.layout`): tokens
are scattered into a static buffer of about ``2T`` rows (long documents on whole
chunks of their own; short ones, which fit one chunk and so see only the initial
weights, share chunks), the op runs with ``resets`` at the documents' first rows, and
the outputs are gathered back. The buffer's static bound, ``2⌈T/C⌉ + 2`` chunks
whatever the documents, costs about twice the unpacked run (2.5× at ``T = 256``,
``C = 64``); the op runs over its first ``⌈T/C⌉ + 2`` chunks instead when every row's
documents fit there (any row of up to three documents does; a ``lax.cond`` picks,
and only the branch taken runs), so a batch of a few long documents per row costs
about ``1 + 2C/T`` times the unpacked run. The short convolutions do not read across
a boundary.
``mode="recurrent"`` feeds tokens one at a time and restarts the memory (and the
buffer) at each document's first token. The returned state continues each row's
last document (its boundary memory, its open chunk's tokens, ``document_tokens``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MemoryOptimizer, MixerConfig
from xformjax.nn.conv import ShortConv
from xformjax.nn.mixer import Mixer, OutputHead, position_of, split_heads
from xformjax.nn.norms import l2_normalize
from xformjax.nn.packing import Packing
from xformjax.nn.states import ConvCaches, MemoryTokens, NeuralMemoryState
from xformjax.nn.streams import STREAMS, init_conv_caches, silu_streams, stream_layers
from xformjax.ops.common.validation import Mode
from xformjax.ops.neural_memory import init_neural_memory_state, neural_memory
from xformjax.ops.neural_memory.layout import (
    Layout,
    compact_slots,
    document_layout,
    gather,
    scatter,
    used_rows,
)

#: gate name → initial bias of its logit.
_GATE_BIAS = {"lr": -3.0, "momentum": 0.0, "decay": -4.0}

#: the op's state: ``weight_l``, ``momentum_l`` (and ``window_*`` with the Omega rule).
MemoryOpState = dict[str, jax.Array]


def after_buffer(
    buffered: jax.Array, new: jax.Array, count: jax.Array | int, size: int
) -> jax.Array:
    """``[B, size, …]``: the first ``count`` rows of ``buffered`` ``[B, C, …]``, then
    ``new`` ``[B, T, …]``, zeros after."""
    room = jnp.zeros((new.shape[0], size) + new.shape[2:], new.dtype)
    room = jax.lax.dynamic_update_slice_in_dim(room, buffered, 0, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(room, new, count, axis=1)


def open_chunk(
    stream: jax.Array, start: jax.Array | int, kept: jax.Array | int, chunk: int
) -> jax.Array:
    """The ``chunk`` rows of ``stream`` ``[B, T, …]`` from row ``start`` (a chunk
    boundary), zero from row ``kept`` of them on: the new buffer of the open chunk."""
    zeros = jnp.zeros((stream.shape[0], chunk) + stream.shape[2:], stream.dtype)
    padded = jnp.concatenate([stream, zeros], axis=1)
    window = jax.lax.dynamic_slice_in_dim(padded, start, chunk, axis=1)
    valid = (jnp.arange(chunk) < kept).reshape((1, chunk) + (1,) * (window.ndim - 2))
    return jnp.where(valid, window, 0)


def pad_rows(stream: jax.Array, rows: int) -> jax.Array:
    """``[B, T, …]`` → ``[B, rows, …]`` with zero rows after ``T``."""
    extra = rows - stream.shape[1]
    return jnp.pad(stream, ((0, 0), (0, extra)) + ((0, 0),) * (stream.ndim - 2))


def select_rows(flag: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` ``[B]`` is set, else ``old`` (pytrees of ``[B, …]``)."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(flag.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def token_by_token(
    run: Callable[[Any, Any, jax.Array], tuple[Any, Any]],
    tokens: Any,
    carry: Any,
    position: jax.Array,
) -> tuple[Any, Any]:
    """Feed ``tokens`` (a pytree of ``[B, T, …]``) one at a time, as ``[B, 1, …]``, to
    ``run(token, carry, position) -> (outputs, carry)`` in a ``lax.scan``; returns the
    outputs stacked to ``[B, T, …]`` and the last carry."""

    def step(scan_carry, token):
        carry, pos = scan_carry
        outputs, carry = run(jax.tree.map(lambda a: a[:, None], token), carry, pos)
        return (carry, pos + 1), jax.tree.map(lambda a: a[:, 0], outputs)

    per_token = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), tokens)
    (carry, _), outputs = jax.lax.scan(step, (carry, position), per_token)
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs), carry


class NeuralMemoryMixer(Mixer):
    """Shared body of Titans (MAL, MAG, MAC) and ATLAS: projections, gates, the memory
    with its chunk-boundary buffer, the output head. Called, it is the MAL layer."""

    modes: ClassVar[tuple[Mode, ...]] = ("chunk", "recurrent")
    #: learned per-token Omega weights γ (ATLAS with omega_window > 1).
    learned_gamma: bool = False

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        self.projections, self.convs = stream_layers(
            config, 1, rngs, conv_names=self.conv_streams(config)
        )
        gates = dict(_GATE_BIAS, **({"gamma": 2.0} if self.learned_gamma else {}))
        self.gates = nnx.Dict(
            {
                name: linear.dense(
                    config,
                    d,
                    heads,
                    axes=("embed", "heads"),
                    rngs=rngs,
                    use_bias=True,
                    bias_init=bias,
                    float_output=True,  # the gates σ(x W + b) are computed in float32
                )
                for name, bias in gates.items()
            }
        )
        dims = self.memory_dims()
        self.memory = nnx.List(
            [
                nnx.Param(
                    (
                        jax.random.truncated_normal(
                            rngs.params(), -2.0, 2.0, (heads, dims[i], dims[i + 1])
                        )
                        / math.sqrt(dims[i])
                    ).astype(config.params_dtype),
                    out_sharding=("heads", None, None),
                    eager_sharding=False,
                )
                for i in range(len(dims) - 1)
            ]
        )
        self.head = self.build_head(config, rngs)

    def build_head(self, config: MixerConfig, rngs: nnx.Rngs) -> nnx.Module:
        """The read-out of the memory output (MAL: ``W_o (SiLU(x W_g) ⊙ RMSNorm(o))``)."""
        return OutputHead(
            config,
            config.num_heads,
            config.value_dim,
            norm="rms",
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    # ---------------------------------------------------------------- configuration

    def conv_streams(self, config: MixerConfig) -> tuple[str, ...]:
        """The streams that get a short causal convolution (when ``conv_size > 0``)."""
        return STREAMS

    @property
    def omega_window(self) -> int:
        return 1

    @property
    def optimizer(self) -> MemoryOptimizer:
        return "momentum"

    def memory_dims(self) -> list[int]:
        config = self.config
        hidden = config.memory_expansion * config.key_dim
        return [config.key_dim] + [hidden] * (config.memory_depth - 1) + [config.value_dim]

    def feature_map(self, x: jax.Array) -> jax.Array:
        """Applied to the normalised q and k (identity; ATLAS: a polynomial)."""
        return x

    def state_dtype(self) -> Any:
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    # ---------------------------------------------------------------- state

    def memory_weights(self) -> list[jax.Array]:
        """The memory's initial weights ``[H, d_{l-1}, d_l]`` (parameters)."""
        return [w[...] for w in self.memory]

    def init_memory(self, batch: int) -> MemoryOpState:
        """The op's state of a fresh sequence (the initial weights, zero momentum)."""
        config = self.config
        return init_neural_memory_state(
            self.memory_weights(),
            batch,
            key_dim=config.key_dim,
            value_dim=config.value_dim,
            omega_window=self.omega_window,
            dtype=self.state_dtype(),
        )

    def init_conv(self, batch: int) -> ConvCaches:
        return init_conv_caches(self.convs, batch, self.config.compute_dtype)

    def init_buffer(self, batch: int) -> MemoryTokens:
        """An empty buffer ``[B, C, H, ·]`` of memory tokens."""
        config, dtype = self.config, self.state_dtype()
        shape = (batch, config.chunk_size, config.num_heads)
        gate = jnp.zeros(shape, dtype)
        return MemoryTokens(
            k=jnp.zeros(shape + (config.key_dim,), dtype),
            v=jnp.zeros(shape + (config.value_dim,), dtype),
            lr=gate,
            momentum=gate,
            decay=gate,
            gamma=gate,
        )

    def init_state(self, batch: int, max_len: int | None = None) -> NeuralMemoryState:
        del max_len  # the memory does not grow with the sequence
        return NeuralMemoryState(
            position=jnp.zeros((), jnp.int32),
            memory=self.init_memory(batch),
            buffer=self.init_buffer(batch),
            conv=self.init_conv(batch),
            document_tokens=jnp.zeros((batch,), jnp.int32),
        )

    # ---------------------------------------------------------------- streams

    def memory_streams(
        self,
        x: jax.Array,
        convs: Mapping[str, ShortConv],
        caches: ConvCaches | None,
        packing: Packing | None = None,
    ) -> tuple[jax.Array, MemoryTokens, ConvCaches]:
        """From ``x`` ``[B, T, ·]``: the query ``[B, T, H, K]``, the memory tokens (k, v
        and the gates σ(x W + b)) and the new caches of ``convs`` (which do not read
        across the documents of ``packing``)."""
        heads, dtype = self.config.num_heads, self.state_dtype()
        streams, caches = silu_streams(self.projections, convs, x, caches, packing)
        q, k, v = (split_heads(streams[name], heads) for name in STREAMS)
        q, k = self.feature_map(l2_normalize(q)), self.feature_map(l2_normalize(k))
        gates = {name: jax.nn.sigmoid(gate(x).astype(dtype)) for name, gate in self.gates.items()}
        gamma = gates.get("gamma")
        tokens = MemoryTokens(
            k=k.astype(dtype),
            v=v.astype(dtype),
            lr=gates["lr"],
            momentum=gates["momentum"],
            decay=gates["decay"],
            gamma=jnp.ones(gates["lr"].shape, dtype) if gamma is None else gamma,
        )
        return q.astype(dtype), tokens, caches

    # ---------------------------------------------------------------- memory

    def memory_op(
        self,
        q: jax.Array,
        tokens: MemoryTokens,
        memory: MemoryOpState | None,
        *,
        state_position: jax.Array | int | None = None,
        resets: jax.Array | None = None,
    ) -> tuple[jax.Array, MemoryOpState]:
        """The op's chunk form over ``q``, ``tokens`` ``[B, T, H, ·]`` from ``memory``
        (``None``: the initial weights); returns ``(o [B, T, H, V], the op's state
        after state_position tokens)``; ``resets`` ``[B, T]``: the op's."""
        config = self.config
        o, final = neural_memory(
            q,
            tokens.k,
            tokens.v,
            tokens.lr,
            tokens.momentum,
            tokens.decay,
            self.memory_weights(),
            omega_weights=tokens.gamma,
            omega_window=self.omega_window,
            optimizer=self.optimizer,
            newton_schulz_steps=config.newton_schulz_steps,
            max_surprise_norm=config.max_surprise_norm,
            mode="chunk",
            chunk_size=config.chunk_size,
            initial_state=memory,
            output_final_state=True,
            state_position=state_position,
            resets=resets,
        )
        assert final is not None  # output_final_state=True
        return o, final

    def packed_memory_op(
        self,
        q: jax.Array,
        tokens: MemoryTokens,
        memory: MemoryOpState | None,
        layout: Layout,
        compact_rows: int,
    ) -> tuple[jax.Array, MemoryOpState]:
        """:meth:`memory_op` over the packed buffer ``[B, S·C, H, ·]`` of ``layout``.

        The buffer is sized for the worst packing (about twice the row); when every
        row's documents fit in its first ``compact_rows`` rows (a row of a few long
        documents does), the chunk form runs over those rows only (``lax.cond``: only
        the branch taken runs) and its outputs are padded back with zero rows."""
        rows = q.shape[1]

        def over(length: int) -> tuple[jax.Array, MemoryOpState]:
            o, final = self.memory_op(
                q[:, :length],
                jax.tree.map(lambda a: a[:, :length], tokens),
                memory,
                state_position=layout.boundary,
                resets=layout.resets[:, :length],
            )
            return pad_rows(o, rows), final

        if compact_rows >= rows:
            return over(rows)
        return jax.lax.cond(
            used_rows(layout, self.config.chunk_size) <= compact_rows,
            lambda: over(compact_rows),
            lambda: over(rows),
        )

    def run_memory(
        self,
        q: jax.Array,
        tokens: MemoryTokens,
        memory: MemoryOpState | None,
        buffer: MemoryTokens | None,
        counted: jax.Array | None,
        starts: jax.Array | None = None,
    ) -> tuple[jax.Array, MemoryOpState, MemoryTokens, jax.Array]:
        """The chunk form from the last boundary, with the buffered tokens in front
        (``memory`` ``None``: a fresh sequence; ``counted`` ``[B]``: the current
        document's tokens so far; ``starts`` ``[B, T]``: documents packed in the rows,
        laid out on their own chunk grids by :mod:`xformjax.ops.neural_memory.layout`);
        → ``(o, memory, buffer, counted)`` of each row's last document."""
        chunk = self.config.chunk_size
        batch, length = q.shape[:2]
        if memory is None or buffer is None or counted is None:
            memory, count, size = None, jnp.zeros((batch,), jnp.int32), length
            combined_q, combined, combined_starts = q, tokens, starts
            counted = jnp.zeros((batch,), jnp.int32)
        else:
            count, size = counted % chunk, chunk + length
            place = jax.vmap(lambda old, new, n: after_buffer(old[None], new[None], n, size)[0])
            combined_q = place(jnp.zeros((batch, chunk) + q.shape[2:], q.dtype), q, count)
            combined = jax.tree.map(lambda old, new: place(old, new, count), buffer, tokens)
            combined_starts = (
                None if starts is None else place(jnp.zeros((batch, chunk), bool), starts, count)
            )
        total = count + length
        if combined_starts is None and memory is None:
            # a fresh call: the last chunk padded with unused rows (γ = θ = 0) to C rows,
            # so its arithmetic is that of a packed document's chunk (same shapes)
            boundary = total // chunk * chunk
            rows = -(-length // chunk) * chunk
            o, new_memory = self.memory_op(
                pad_rows(combined_q, rows),
                jax.tree.map(lambda a: pad_rows(a, rows), combined),
                None,
                state_position=(length // chunk) * chunk,
            )
            o = o[:, :length]
            counted = counted + length
        elif combined_starts is None:
            boundary = total // chunk * chunk
            o, new_memory = self.memory_op(combined_q, combined, memory, state_position=boundary)
            counted = counted + length
        else:
            valid = jnp.arange(size)[None, :] < total[:, None]
            layout = document_layout(combined_starts, valid, chunk, continuing=memory is not None)
            o, new_memory = self.packed_memory_op(
                scatter(combined_q, layout),
                jax.tree.map(lambda a: scatter(a, layout), combined),
                memory,
                layout,
                compact_slots(size, chunk) * chunk,
            )
            o = gather(o, layout)
            new_memory = select_rows(layout.fresh, self.init_memory(batch), new_memory)
            boundary = total - layout.open_tokens
            begun = jnp.any(combined_starts, axis=1)
            counted = jnp.where(begun, layout.document_tokens, counted + length)
        if memory is not None:
            o = jax.vmap(lambda a, n: jax.lax.dynamic_slice_in_dim(a, n, length, axis=0))(o, count)
        dtype = self.state_dtype()
        keep = jax.vmap(lambda a, b, n: open_chunk(a[None], b, n, chunk)[0])
        new_buffer = jax.tree.map(
            lambda stream: keep(stream, boundary, total - boundary).astype(dtype), combined
        )
        return o, new_memory, new_buffer, counted

    def memory_branch(
        self,
        x: jax.Array,
        state: NeuralMemoryState | None,
        mode: Mode,
        packing: Packing | None = None,
    ) -> tuple[jax.Array, MemoryOpState, MemoryTokens, jax.Array, ConvCaches]:
        """The memory read ``o`` ``[B, T, H, V]`` of ``x`` and the new memory, buffer,
        document token count and convolution caches (token by token in ``"recurrent"``
        mode; ``packing``: documents packed in the rows, each on its own chunk grid from
        the initial memory)."""
        q, tokens, conv = self.memory_streams(
            x, self.convs, None if state is None else state.conv, packing
        )
        starts = None if packing is None else packing.starts
        if mode == "recurrent" and x.shape[1] > 1:
            if state is None:
                state = self.init_state(x.shape[0])
            initial = self.init_memory(x.shape[0])

            def run(token, carry, pos):
                del pos
                (q, tokens, start), (memory, buffer, counted) = token, carry
                if start is not None:  # a document begins: the memory starts afresh
                    memory = select_rows(start[:, 0], initial, memory)
                    counted = jnp.where(start[:, 0], 0, counted)
                o, memory, buffer, counted = self.run_memory(q, tokens, memory, buffer, counted)
                return o, (memory, buffer, counted)

            o, (memory, buffer, counted) = token_by_token(
                run,
                (q, tokens, starts),
                (state.memory, state.buffer, state.document_tokens),
                state.position,
            )
        elif state is None:
            o, memory, buffer, counted = self.run_memory(q, tokens, None, None, None, starts)
        else:
            o, memory, buffer, counted = self.run_memory(
                q, tokens, state.memory, state.buffer, state.document_tokens, starts
            )
        return o, memory, buffer, counted, conv

    # ---------------------------------------------------------------- call

    def sequence_flops(self, seq_len: int) -> float:
        """Per token and head: the window's loss gradients at the chunk-start weights
        (forward + backward, ``6·P`` each, ``P = Σ d_{l-1} d_l``), the momentum and
        weight recurrences (``4·P``: the recurrence's own work, although the chunk
        form runs each as a ``C × C`` transfer matmul, ``2·C·P``), the read-out with
        the token's weights (``2·P``); Muon adds the Newton–Schulz iterations on
        every momentum matrix."""
        del seq_len
        dims = self.memory_dims()
        params = sum(a * b for a, b in itertools.pairwise(dims))
        per_head = 6.0 * params * self.omega_window + 6.0 * params
        if self.optimizer == "muon":
            for a, b in itertools.pairwise(dims):
                small, large = min(a, b), max(a, b)
                per_head += self.config.newton_schulz_steps * (
                    4.0 * small * small * large + 2.0 * small**3
                )
        return float(self.config.num_heads * per_head)

    def __call__(
        self,
        x: jax.Array,
        *,
        state: NeuralMemoryState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, NeuralMemoryState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``; ``segment_ids``,
        ``positions`` ``[B, T]``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        packing = self.packing(x, state, segment_ids, positions)
        position = position_of(state)
        o, memory, buffer, counted, conv = self.memory_branch(x, state, mode, packing)
        y = self.head(o, x)
        return y, NeuralMemoryState(
            position=position + x.shape[1],
            memory=memory,
            buffer=buffer,
            conv=conv,
            document_tokens=counted,
        )
