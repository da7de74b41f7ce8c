"""Titans: a per-head MLP memory trained at test time, as a sequence mixer.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025. The default
variant is memory as a layer (MAL: the neural memory is the mixer); MAG and MAC
are below:

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))   (short causal conv)
    q, k   ← q/‖q‖, k/‖k‖  (per head)
    θ_t = σ(x_t W_θ + b_θ),  η_t = σ(x_t W_η + b_η),  α_t = σ(x_t W_α + b_α)   (per head;
          b_θ starts at −3 so the inner learning rate starts near 0.05)
    u_t = ∇_W ½‖M_{W_{t-1}}(k_t) − v_t‖²
    m_t = η_t m_{t-1} − θ_t u_t ;   W_t = (1 − α_t) W_{t-1} + m_t
    o_t = M_{W_t}(q_t);   y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

``M_W`` is an MLP of ``config.memory_depth`` layers (hidden width
``memory_expansion · head_dim``, SiLU between layers, no biases; depth 1 is a
linear memory); its initial weights are parameters of the layer. The op is
:func:`xformjax.ops.neural_memory.neural_memory`.

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

State (MAL): ``weight_l``, ``momentum_l`` ``[B, H, d_{l-1}, d_l]`` (at the chunk
boundary), ``buffer_*`` ``[B, C, H, ·]`` (k, v, θ, η, α, γ of the buffered tokens, zero
beyond the count), the convolutions' caches, ``position``.

``titans_variant="mag"`` (memory as a gate). ``P = persistent_tokens`` learned
tokens ``p_1 … p_P`` (``[P, d_model]``) are put before the sequence for the
attention branch only; the memory branch is exactly MAL's memory on ``x``:

    q^a, k^a, v^a = RoPE(x W_q^a), RoPE(x W_k^a), x W_v^a;  k^p, v^p = p W_k^a, p W_v^a
    a_t = Σ_{j ∈ persistent ∪ [t−W+1, t]} softmax_j(q^a_t · k_j / √K) v_j    (W = memory_window)
    o_t = M_{W_t}(q_t)                                     (the memory read, as in MAL)
    y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))   (per head; both norms learned)

This is the paper's ``o = y ⊗ M(x̃)`` with its stated choice for ``⊗``: both
branch outputs normalised with learnable vector-valued weights, then a
non-linearity (σ on the memory side). The memory branch reads ``x`` only (the
persistent tokens do not write into it). The attention is computed blockwise
(:mod:`xformjax.nn.sliding_attention`, ``O(T·(P + W))``); the state adds
``attn_k`` / ``attn_v`` ``[B, W−1, H, ·]``, the last ``W − 1`` (RoPE'd) keys/values.

``titans_variant="mac"`` (memory as context), per segment ``s`` of ``C = chunk_size``
tokens with the memory ``W_s`` at its start:

    h_t = M_{W_s}(q_t)                        (q_t: MAL's query stream of x; read only)
    c_t = merge(h_t) W_c;  k^h_t, v^h_t = RoPE(c_t W_k^a), c_t W_v^a
    a_t = attention of q^a_t over [k^p, v^p] ∪ {h_j : j ≤ t} ∪ {x_j : j ≤ t}, j in segment s
    ỹ_t = merge(a_t) W_y;  q, k, v, θ, η, α of the memory are computed from ỹ (no conv)
    W_{s+1}: the memory's chunk update with the segment's (k, v) from ỹ
    o_t = M_{W_t}(q_t(ỹ_t))                   (per-token weights inside the segment)
    y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))

following the paper (``h = M*_{t-1}(q)``, ``ỹ = Attn([p, h, S])``, ``M_t = M_{t-1}(ỹ)``,
``o = ỹ ⊗ M*_t(ỹ)``) with the same ``⊗`` as MAG. The attention is confined to the
segment (RoPE at the in-segment position); the h tokens are mapped to width
``d_model`` by ``W_c`` and share the attention's key/value projections. Segments
run one after the other (``lax.scan``, linear in ``T``). The state keeps the memory
at the last segment boundary and the segment's tokens so far (``segment_q``,
``segment_qa/ka/va`` ``[B, C, H, ·]``); a call recomputes the open segment from
the boundary, so decoding equals the full forward exactly. Only the retrieval
query has a short convolution (``conv_q``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear, norms
from xformjax.nn.config import MixerConfig
from xformjax.nn.deltanet import silu_streams, stream_layers
from xformjax.nn.mixer import (Mixer, OutputHead, State, l2_normalize, merge_heads, position_of,
                               register, split_heads)
from xformjax.nn.positional import apply_rope, token_positions
from xformjax.nn.sliding_attention import (masked_attention, sliding_window_attention,
                                           with_persistent)
from xformjax.ops.neural_memory import init_neural_memory_state, neural_memory

_STREAMS = ("q", "k", "v")
#: per-token streams buffered between chunk boundaries (θ, η, α, γ and k, v).
_BUFFERED = ("k", "v", "lr", "momentum", "decay", "gamma")
#: gate name → initial bias of its logit.
_GATE_BIAS = {"lr": -3.0, "momentum": 0.0, "decay": -4.0}


class NeuralMemoryMixer(Mixer):
    """Shared body of ``titans`` (MAL) and ``atlas``: projections, gates, the memory
    with its chunk-boundary buffer, the output head."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "recurrent")
    #: learned per-token Omega weights γ (ATLAS with omega_window > 1).
    learned_gamma: ClassVar[bool] = False

    def __init__(self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1,
                 rngs: nnx.Rngs):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        self.projections, self.convs = stream_layers(config, 1, rngs,
                                                     conv_names=self.conv_streams(config))
        gates = dict(_GATE_BIAS, **({"gamma": 2.0} if self.learned_gamma else {}))
        self.gates = nnx.Dict({name: linear.dense(config, d, heads, axes=("embed", "heads"),
                                                  rngs=rngs, use_bias=True, bias_init=bias)
                               for name, bias in gates.items()})
        dims = self.memory_dims()
        self.memory = nnx.List([
            nnx.Param((jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                                   (heads, dims[i], dims[i + 1]))
                       / math.sqrt(dims[i])).astype(config.params_dtype),
                      out_sharding=("heads", None, None), eager_sharding=False)
            for i in range(len(dims) - 1)])
        self.head = self.build_head(config, rngs)

    def build_head(self, config: MixerConfig, rngs: nnx.Rngs) -> nnx.Module:
        """The read-out of the memory output (MAL: ``W_o (SiLU(x W_g) ⊙ RMSNorm(o))``)."""
        return OutputHead(config, config.num_heads, config.value_dim, norm="rms",
                          gate="silu" if config.output_gate else None, rngs=rngs)

    # ---------------------------------------------------------------- configuration

    def conv_streams(self, config: MixerConfig) -> tuple[str, ...]:
        """The streams that get a short causal convolution (when ``conv_size > 0``)."""
        return _STREAMS

    @property
    def omega_window(self) -> int:
        return 1

    @property
    def optimizer(self) -> str:
        return "momentum"

    def memory_dims(self) -> list[int]:
        config = self.config
        hidden = config.memory_expansion * config.key_dim
        return [config.key_dim] + [hidden] * (config.memory_depth - 1) + [config.value_dim]

    def feature_map(self, x: jax.Array) -> jax.Array:
        """Applied to the normalised q and k (identity; ATLAS: a polynomial)."""
        return x

    def state_dtype(self):
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    # ---------------------------------------------------------------- state

    def _memory_weights(self) -> list[jax.Array]:
        return [w[...] for w in self.memory]

    def init_state(self, batch: int, max_len: int | None = None) -> State:
        del max_len  # the memory does not grow with the sequence
        config, dtype = self.config, self.state_dtype()
        state = init_neural_memory_state(self._memory_weights(), batch,
                                         key_dim=config.key_dim, value_dim=config.value_dim,
                                         omega_window=self.omega_window, dtype=dtype)
        chunk, heads = config.chunk_size, config.num_heads
        widths = {"k": (config.key_dim,), "v": (config.value_dim,)}
        for name in _BUFFERED:
            state[f"buffer_{name}"] = jnp.zeros((batch, chunk, heads) + widths.get(name, ()),
                                                dtype)
        for name, conv in self.convs.items():
            state[f"conv_{name}"] = conv.init_cache(batch, config.compute_dtype)
        state["position"] = jnp.zeros((), jnp.int32)
        return state

    # ---------------------------------------------------------------- streams

    def _streams(self, x: jax.Array, state: State | None):
        """Per-token op inputs ``[B, T, H, ·]`` / ``[B, T, H]`` and the conv caches."""
        heads, dtype = self.config.num_heads, self.state_dtype()
        streams, caches = silu_streams(self.projections, self.convs, x, state)
        streams = {name: split_heads(value, heads) for name, value in streams.items()}
        for name in ("q", "k"):
            streams[name] = self.feature_map(l2_normalize(streams[name]))
        for name, gate in self.gates.items():
            streams[name] = jax.nn.sigmoid(gate(x).astype(dtype))
        if "gamma" not in streams:
            streams["gamma"] = jnp.ones(streams["lr"].shape, dtype)
        return {name: value.astype(dtype) for name, value in streams.items()}, caches

    # ---------------------------------------------------------------- memory

    def _run_memory(self, streams: dict, state: State | None, position) -> tuple[jax.Array, dict]:
        """The chunk form from the last boundary, with the buffered tokens in front."""
        chunk = self.config.chunk_size
        length = streams["q"].shape[1]
        if state is None:
            count, combined, boundary = 0, streams, None
        else:
            count = position % chunk
            boundary = {key: value for key, value in state.items()
                        if key.startswith(("weight_", "momentum_", "window_"))}
            combined = {}
            for name, new in streams.items():
                old = (state[f"buffer_{name}"] if name != "q"
                       else jnp.zeros((new.shape[0], chunk) + new.shape[2:], new.dtype))
                room = jnp.concatenate([old, jnp.zeros_like(new)], axis=1)
                combined[name] = jax.lax.dynamic_update_slice_in_dim(room, new, count, axis=1)
        total = count + length
        boundary_index = (total // chunk) * chunk
        o, new_boundary = neural_memory(
            combined["q"], combined["k"], combined["v"], combined["lr"], combined["momentum"],
            combined["decay"], self._memory_weights(), omega_weights=combined["gamma"],
            omega_window=self.omega_window, optimizer=self.optimizer,
            newton_schulz_steps=self.config.newton_schulz_steps,
            max_surprise_norm=self.config.max_surprise_norm, mode="chunk",
            chunk_size=chunk, initial_state=boundary, output_final_state=True,
            state_position=boundary_index)
        if state is not None:
            o = jax.lax.dynamic_slice_in_dim(o, count, length, axis=1)
        new_state = dict(new_boundary)
        kept = total - boundary_index
        for name in _BUFFERED:
            stream = combined[name]
            zeros = jnp.zeros((stream.shape[0], chunk) + stream.shape[2:], stream.dtype)
            padded = jnp.concatenate([stream, zeros], axis=1)
            window = jax.lax.dynamic_slice_in_dim(padded, boundary_index, chunk, axis=1)
            valid = (jnp.arange(chunk) < kept).reshape((1, chunk) + (1,) * (window.ndim - 2))
            new_state[f"buffer_{name}"] = jnp.where(valid, window, 0).astype(self.state_dtype())
        return o, new_state

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
        params = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
        per_head = 6.0 * params * self.omega_window + 6.0 * params
        if self.optimizer == "muon":
            for a, b in zip(dims[:-1], dims[1:]):
                small, large = min(a, b), max(a, b)
                per_head += self.config.newton_schulz_steps * (
                    4.0 * small * small * large + 2.0 * small ** 3)
        return float(self.config.num_heads * per_head)

    def __call__(self, x: jax.Array, *, state: State | None = None,
                 mode: str | None = None) -> tuple[jax.Array, State]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        position = position_of(state)
        streams, caches = self._streams(x, state)
        if mode == "recurrent" and x.shape[1] > 1:
            o, memory_state = self._token_by_token(streams, state, x.shape[0], position)
        else:
            o, memory_state = self._run_memory(streams, state, position)
        y = self.head(o, x)
        return y, {**memory_state, **caches, "position": position + x.shape[1]}

    def _token_by_token(self, streams, state, batch, position):
        if state is None:
            state = self.init_state(batch)
        carried = {key: value for key, value in state.items()
                   if key.startswith(("weight_", "momentum_", "window_", "buffer_"))}

        def step(carry, token):
            memory_state, pos = carry
            token = {name: value[:, None] for name, value in token.items()}
            o, memory_state = self._run_memory(token, memory_state, pos)
            return (memory_state, pos + 1), o[:, 0]

        per_token = {name: jnp.moveaxis(value, 1, 0) for name, value in streams.items()}
        (carried, _), o = jax.lax.scan(step, (carried, position), per_token)
        return jnp.moveaxis(o, 0, 1), carried


class GatedReadout(nnx.Module):
    """MAG's combination of the two branches, per head:
    ``y = W_o · merge(RMSNorm_a(attention) ⊙ σ(RMSNorm_m(memory)))``."""

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
        heads, value_dim = config.num_heads, config.value_dim
        self.attention_norm, self.memory_norm = (
            norms.make_norm("rms", value_dim, eps=config.norm_eps,
                            param_dtype=config.params_dtype, axis_name=None)
            for _ in range(2))
        self.out = linear.dense(config, heads * value_dim, config.d_model,
                                axes=("heads", "embed"), rngs=rngs)

    def __call__(self, attention: jax.Array, memory: jax.Array, dtype) -> jax.Array:
        gated = self.attention_norm(attention) * jax.nn.sigmoid(self.memory_norm(memory))
        return self.out(merge_heads(gated).astype(dtype))


class AttentionBranch(nnx.Module):
    """Query/key/value projections (RoPE on q, k) and the learned persistent tokens
    ``[P, d_model]`` whose keys/values (no RoPE) every query sees."""

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
        heads, d = config.num_heads, config.d_model
        widths = {"q": heads * config.key_dim, "k": heads * config.key_dim,
                  "v": heads * config.value_dim}
        self.config = config
        self.projections = nnx.Dict({name: linear.dense(config, d, width,
                                                        axes=("embed", "heads"), rngs=rngs)
                                     for name, width in widths.items()})
        count = config.persistent_tokens
        self.persistent = (nnx.Param(jax.random.normal(rngs.params(), (count, d),
                                                       config.params_dtype),
                                     out_sharding=(None, "embed"), eager_sharding=False)
                           if count else None)

    def __call__(self, x: jax.Array, positions: jax.Array, rope: bool = True):
        """``x`` ``[B, T, ·]`` → ``q, k, v`` ``[B, T, H, ·]`` (RoPE at ``positions``)."""
        heads, theta = self.config.num_heads, self.config.rope_theta
        q, k, v = (split_heads(self.projections[name](x), heads) for name in _STREAMS)
        if rope:
            q = apply_rope(q, positions, base=theta)
            k = apply_rope(k, positions, base=theta)
        return q, k, v

    def persistent_kv(self, dtype):
        """``(k^p [P, H, K], v^p [P, H, V])`` or ``(None, None)`` when ``P = 0``."""
        if self.persistent is None:
            return None, None
        tokens = self.persistent[...].astype(self.config.compute_dtype)
        heads = self.config.num_heads
        return tuple(split_heads(self.projections[name](tokens), heads).astype(dtype)
                     for name in ("k", "v"))


@register("titans")
class Titans(NeuralMemoryMixer):
    """Titans: memory as a layer (MAL), as a gate (MAG) or as context (MAC); see the
    module docstring."""

    def __init__(self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1,
                 rngs: nnx.Rngs):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        self.variant = config.titans_variant
        if self.variant != "mal":
            self.attention = AttentionBranch(config, rngs=rngs)
        if self.variant == "mac":
            width = config.num_heads * config.value_dim
            # h (memory read-out) → a token of width d_model; attention output → y
            self.context_proj = linear.dense(config, width, config.d_model,
                                             axes=("heads", "embed"), rngs=rngs)
            self.summary_proj = linear.dense(config, width, config.d_model,
                                             axes=("heads", "embed"), rngs=rngs)

    def conv_streams(self, config: MixerConfig) -> tuple[str, ...]:
        # MAC: only the retrieval query comes from x; k, v are computed from y
        return ("q",) if config.titans_variant == "mac" else _STREAMS

    def build_head(self, config: MixerConfig, rngs: nnx.Rngs) -> nnx.Module:
        if config.titans_variant in ("mag", "mac"):
            return GatedReadout(config, rngs=rngs)
        return super().build_head(config, rngs)

    def init_state(self, batch: int, max_len: int | None = None) -> State:
        if self.variant == "mac":
            return self._context_init_state(batch)
        state = super().init_state(batch, max_len)
        if self.variant == "mag":
            config, dtype = self.config, self.state_dtype()
            span = config.memory_window - 1
            state["attn_k"] = jnp.zeros((batch, span, config.num_heads, config.key_dim), dtype)
            state["attn_v"] = jnp.zeros((batch, span, config.num_heads, config.value_dim),
                                        dtype)
        return state

    def sequence_flops(self, seq_len: int) -> float:
        flops = super().sequence_flops(seq_len)
        if self.variant == "mag":  # the blockwise window: P + 2W scores and values per query
            config = self.config
            keys = config.persistent_tokens + 2 * config.memory_window
            flops += 2.0 * config.num_heads * keys * (config.key_dim + config.value_dim)
        if self.variant == "mac":  # the read h, the segment's P + 2C keys (recomputed per call)
            config = self.config
            dims = self.memory_dims()
            flops += 2.0 * config.num_heads * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
            keys = config.persistent_tokens + 2 * config.chunk_size
            flops += 2.0 * config.num_heads * keys * (config.key_dim + config.value_dim)
        return flops

    def __call__(self, x: jax.Array, *, state: State | None = None,
                 mode: str | None = None) -> tuple[jax.Array, State]:
        if self.variant == "mal":
            return super().__call__(x, state=state, mode=mode)
        if self.variant == "mag":
            return self._gate_call(x, state, mode)
        return self._context_call(x, state, mode)

    def _memory_branch(self, x, state, mode, position):
        streams, caches = self._streams(x, state)
        if mode == "recurrent" and x.shape[1] > 1:
            o, memory_state = self._token_by_token(streams, state, x.shape[0], position)
        else:
            o, memory_state = self._run_memory(streams, state, position)
        return o, {**memory_state, **caches}

    def _gate_call(self, x, state, mode):
        """MAG: sliding-window attention with persistent tokens, gated by the memory."""
        self.check_input(x)
        batch, length, _ = x.shape
        mode = self.resolve_mode(mode, length)
        position = position_of(state)
        memory_out, new_state = self._memory_branch(x, state, mode, position)
        q, k, v = self.attention(x, token_positions(position, length))
        if state is None:
            state = self.init_state(batch)
        dtype = self.state_dtype()
        persistent_k, persistent_v = self.attention.persistent_kv(dtype)
        window = self.config.memory_window
        attended, cache_k, cache_v = sliding_window_attention(
            q, k, v, window=window, cache_k=state["attn_k"], cache_v=state["attn_v"],
            cached=jnp.minimum(position, window - 1), persistent_k=persistent_k,
            persistent_v=persistent_v)
        y = self.head(attended, memory_out, x.dtype)
        return y, {**new_state, "attn_k": cache_k.astype(dtype), "attn_v": cache_v.astype(dtype),
                   "position": position + length}

    # ---------------------------------------------------------------- MAC

    def _context_init_state(self, batch: int) -> State:
        config, dtype = self.config, self.state_dtype()
        state = init_neural_memory_state(self._memory_weights(), batch,
                                         key_dim=config.key_dim, value_dim=config.value_dim,
                                         dtype=dtype)
        widths = {"q": config.key_dim, "qa": config.key_dim, "ka": config.key_dim,
                  "va": config.value_dim}
        for name, width in widths.items():
            state[f"segment_{name}"] = jnp.zeros(
                (batch, config.chunk_size, config.num_heads, width), dtype)
        for name, conv in self.convs.items():
            state[f"conv_{name}"] = conv.init_cache(batch, config.compute_dtype)
        state["position"] = jnp.zeros((), jnp.int32)
        return state

    def _context_streams(self, x, state, position):
        """Per new token: the retrieval query (conv, SiLU, L2 norm) and the attention
        q, k, v with RoPE at the in-segment position ``(position + t) mod C``."""
        config, dtype = self.config, self.state_dtype()
        query = self.projections["q"](x)
        caches = {}
        if "q" in self.convs:
            cache = None if state is None else state["conv_q"]
            query, caches["conv_q"] = self.convs["q"](query, cache)
        query = l2_normalize(split_heads(jax.nn.silu(query), config.num_heads))
        offsets = token_positions(position, x.shape[1]) % config.chunk_size
        qa, ka, va = self.attention(x, offsets)
        streams = {"q": query, "qa": qa, "ka": ka, "va": va}
        return {name: value.astype(dtype) for name, value in streams.items()}, caches

    def _segment(self, boundary: dict, segment: dict):
        """One segment ``[B, C, …]`` from the memory at its start: retrieval, attention
        over [persistent, h, tokens], memory update with y; → (attention out, memory
        out, memory at the segment end)."""
        config, dtype = self.config, self.state_dtype()
        heads, size = config.num_heads, config.chunk_size
        depth = len(self.memory)
        weights = [boundary[f"weight_{i}"] for i in range(depth)]
        h = segment["q"]
        for index, w in enumerate(weights):                   # h = M_{W_s}(q)
            h = jnp.einsum("bchd,bhde->bche", h, w)
            if index < depth - 1:
                h = jax.nn.silu(h)
        context = self.context_proj(merge_heads(h).astype(config.compute_dtype))
        _, kh, vh = self.attention(context, jnp.arange(size), rope=False)
        kh = apply_rope(kh, jnp.arange(size), base=config.rope_theta)
        persistent_k, persistent_v = self.attention.persistent_kv(dtype)
        keys = jnp.concatenate([kh.astype(dtype), segment["ka"]], 1)
        values = jnp.concatenate([vh.astype(dtype), segment["va"]], 1)
        keys, values, count = with_persistent(keys, values, persistent_k, persistent_v,
                                              (keys.shape[0],))
        causal = jnp.tril(jnp.ones((size, size), bool))
        mask = jnp.concatenate([jnp.ones((size, count), bool), causal, causal], 1)
        attended = masked_attention(segment["qa"], keys, values, mask)   # [B, C, H, V]
        y = self.summary_proj(merge_heads(attended).astype(config.compute_dtype))
        q, k, v = (split_heads(jax.nn.silu(self.projections[name](y)), heads)
                   for name in _STREAMS)
        q, k = l2_normalize(q), l2_normalize(k)
        gates = {name: jax.nn.sigmoid(gate(y).astype(dtype)) for name, gate in self.gates.items()}
        read, new_boundary = neural_memory(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), gates["lr"], gates["momentum"],
            gates["decay"], self._memory_weights(), mode="chunk", chunk_size=size,
            max_surprise_norm=config.max_surprise_norm, initial_state=boundary,
            output_final_state=True)
        return attended, read, new_boundary

    def _context_run(self, streams: dict, state: State, position):
        """The segments from the last boundary, the buffered tokens in front."""
        chunk = self.config.chunk_size
        length = streams["q"].shape[1]
        count = position % chunk
        total = count + length
        segments = -(-(chunk + length) // chunk)
        combined = {}
        for name, new in streams.items():
            room = jnp.zeros((new.shape[0], segments * chunk) + new.shape[2:], new.dtype)
            room = jax.lax.dynamic_update_slice_in_dim(room, state[f"segment_{name}"], 0, 1)
            combined[name] = jax.lax.dynamic_update_slice_in_dim(room, new, count, axis=1)
        boundary = {key: value for key, value in state.items()
                    if key.startswith(("weight_", "momentum_"))}

        def step(carry, xs):
            memory_state, end = carry
            segment = {name: value for name, value in xs.items()}
            attended, read, new_state = self._segment(memory_state, segment)
            end = end + chunk
            memory_state = jax.tree.map(lambda a, b: jnp.where(end <= total, a, b),
                                        new_state, memory_state)
            return (memory_state, end), (attended, read)

        per_segment = {name: jnp.moveaxis(value.reshape((value.shape[0], segments, chunk)
                                                        + value.shape[2:]), 1, 0)
                       for name, value in combined.items()}
        (boundary, _), (attended, read) = jax.lax.scan(
            jax.checkpoint(step), (boundary, jnp.zeros((), jnp.int32)), per_segment)

        def unsegment(a):  # [S, B, C, H, V] -> the new tokens' rows [B, T, H, V]
            a = jnp.moveaxis(a, 0, 1).reshape((a.shape[1], segments * chunk) + a.shape[3:])
            return jax.lax.dynamic_slice_in_dim(a, count, length, axis=1)

        new_state = dict(boundary)
        start = (total // chunk) * chunk
        kept = total - start
        for name, value in combined.items():
            window = jax.lax.dynamic_slice_in_dim(value, start, chunk, axis=1)
            valid = (jnp.arange(chunk) < kept)[None, :, None, None]
            new_state[f"segment_{name}"] = jnp.where(valid, window, 0).astype(value.dtype)
        return unsegment(attended), unsegment(read), new_state

    def _context_call(self, x, state, mode):
        """MAC: per segment, attention over [persistent, M(q), tokens]; memory ← y."""
        self.check_input(x)
        batch, length, _ = x.shape
        mode = self.resolve_mode(mode, length)
        position = position_of(state)
        streams, caches = self._context_streams(x, state, position)
        if state is None:
            state = self.init_state(batch)
        carried = {key: value for key, value in state.items()
                   if key.startswith(("weight_", "momentum_", "segment_"))}
        if mode == "recurrent" and length > 1:
            def step(carry, token):
                parts, pos = carry
                token = {name: value[:, None] for name, value in token.items()}
                attended, read, parts = self._context_run(token, parts, pos)
                return (parts, pos + 1), (attended[:, 0], read[:, 0])

            per_token = {name: jnp.moveaxis(value, 1, 0) for name, value in streams.items()}
            (carried, _), (attended, read) = jax.lax.scan(step, (carried, position), per_token)
            attended, read = jnp.moveaxis(attended, 0, 1), jnp.moveaxis(read, 0, 1)
        else:
            attended, read, carried = self._context_run(streams, carried, position)
        y = self.head(attended, read, x.dtype)
        return y, {**carried, **caches, "position": position + length}
