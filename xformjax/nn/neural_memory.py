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
convolutions' caches) and ``position``.
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
from xformjax.nn.states import ConvCaches, MemoryTokens, NeuralMemoryState
from xformjax.nn.streams import STREAMS, init_conv_caches, silu_streams, stream_layers
from xformjax.ops.common.validation import Mode
from xformjax.ops.neural_memory import init_neural_memory_state, neural_memory

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
        )

    # ---------------------------------------------------------------- streams

    def memory_streams(
        self, x: jax.Array, convs: Mapping[str, ShortConv], caches: ConvCaches | None
    ) -> tuple[jax.Array, MemoryTokens, ConvCaches]:
        """From ``x`` ``[B, T, ·]``: the query ``[B, T, H, K]``, the memory tokens (k, v
        and the gates σ(x W + b)) and the new caches of ``convs``."""
        heads, dtype = self.config.num_heads, self.state_dtype()
        streams, caches = silu_streams(self.projections, convs, x, caches)
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
    ) -> tuple[jax.Array, MemoryOpState]:
        """The op's chunk form over ``q``, ``tokens`` ``[B, T, H, ·]`` from ``memory``
        (``None``: the initial weights); returns ``(o [B, T, H, V], the op's state
        after state_position tokens)``."""
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
        )
        assert final is not None  # output_final_state=True
        return o, final

    def run_memory(
        self,
        q: jax.Array,
        tokens: MemoryTokens,
        memory: MemoryOpState | None,
        buffer: MemoryTokens | None,
        position: jax.Array,
    ) -> tuple[jax.Array, MemoryOpState, MemoryTokens]:
        """The chunk form from the last boundary, with the buffered tokens in front
        (``memory`` ``None``: a fresh sequence); → ``(o, memory, buffer)``."""
        chunk = self.config.chunk_size
        length = q.shape[1]
        if memory is None:
            count = 0
        else:
            count = position % chunk
            q = after_buffer(
                jnp.zeros((q.shape[0], chunk) + q.shape[2:], q.dtype), q, count, chunk + length
            )
            tokens = jax.tree.map(
                lambda old, new: after_buffer(old, new, count, chunk + length), buffer, tokens
            )
        total = count + length
        boundary_index = (total // chunk) * chunk
        o, new_memory = self.memory_op(q, tokens, memory, state_position=boundary_index)
        if memory is not None:
            o = jax.lax.dynamic_slice_in_dim(o, count, length, axis=1)
        dtype = self.state_dtype()
        new_buffer = jax.tree.map(
            lambda stream: open_chunk(stream, boundary_index, total - boundary_index, chunk).astype(
                dtype
            ),
            tokens,
        )
        return o, new_memory, new_buffer

    def memory_branch(
        self, x: jax.Array, state: NeuralMemoryState | None, mode: Mode, position: jax.Array
    ) -> tuple[jax.Array, MemoryOpState, MemoryTokens, ConvCaches]:
        """The memory read ``o`` ``[B, T, H, V]`` of ``x`` and the new memory, buffer and
        convolution caches (token by token in ``"recurrent"`` mode)."""
        q, tokens, conv = self.memory_streams(x, self.convs, None if state is None else state.conv)
        if mode == "recurrent" and x.shape[1] > 1:
            if state is None:
                state = self.init_state(x.shape[0])

            def run(token, carry, pos):
                (q, tokens), (memory, buffer) = token, carry
                o, memory, buffer = self.run_memory(q, tokens, memory, buffer, pos)
                return o, (memory, buffer)

            o, (memory, buffer) = token_by_token(
                run, (q, tokens), (state.memory, state.buffer), position
            )
        elif state is None:
            o, memory, buffer = self.run_memory(q, tokens, None, None, position)
        else:
            o, memory, buffer = self.run_memory(q, tokens, state.memory, state.buffer, position)
        return o, memory, buffer, conv

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
        self, x: jax.Array, *, state: NeuralMemoryState | None = None, mode: Mode | None = None
    ) -> tuple[jax.Array, NeuralMemoryState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        position = position_of(state)
        o, memory, buffer, conv = self.memory_branch(x, state, mode, position)
        y = self.head(o, x)
        return y, NeuralMemoryState(
            position=position + x.shape[1], memory=memory, buffer=buffer, conv=conv
        )
