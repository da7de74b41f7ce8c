"""Mixture-of-Memories: a router writes each token into a few of M gated delta-rule memories.

``mom`` ("MoM: Linear Sequence Modeling with Mixture-of-Memories", Du et al. 2025)
replaces gated DeltaNet's single matrix memory by M independent ones, each with
its own key, value, step-size and decay projections; the query is shared:

    p_t = softmax(x_t W_r) ∈ Δ^M;   I_t = the top_k memories of p_t
    r_{t,m} = p_{t,m} / Σ_{j∈I_t} p_{t,j} for m ∈ I_t, else 0;
    r_{t,M} = 1 (the always-on shared memory, with config.shared_memory)
    q_t = L2(SiLU(conv(x_t W_q)))                                   (shared by the memories)
    k_{t,m} = L2(SiLU(conv(x_t W_k^m)));  v_{t,m} = SiLU(conv(x_t W_v^m))
    β_{t,m} = σ(x_t W_β^m)  (2σ with allow_neg_eigval);
    log a_{t,m} = −exp(A_log^m)·softplus(x_t W_a^m + dt_bias^m)      (Mamba-2's gate, per memory)
    for each memory m, with S = S^{(m)} [K, V]:
      S_t = a_{t,m} (I − β_{t,m} k_{t,m} k_{t,m}ᵀ) S_{t-1} + β_{t,m} k_{t,m} v_{t,m}ᵀ  (r_{t,m} ≠ 0)
      S_t = S_{t-1}                                                            (r_{t,m} = 0)
    o_t = Σ_m r_{t,m} · S_t^{(m)ᵀ} q_t / √K;     y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

The short causal convolutions run over the whole token stream (every memory's
k and v channels see every token; only the state update is routed).

Documents packed in a row (``segment_ids``, :mod:`xformjax.nn.packing`) stay apart:
every memory, the shared one included, restarts from zero at a document's first token
(the op's ``resets``: a log-decay of :data:`~xformjax.nn.packing.RESET_LOG_GATE` there,
on every memory, routed or not), and the convolutions do not read across a boundary.
The load-balancing loss stays a statistic of the whole call. Memories run
through :func:`xformjax.ops.mixture_of_memories` (linear in T in the chunk
form); the router computes in float32 or wider, whatever the computation dtype.
The layer's state (:class:`~xformjax.nn.states.MixtureOfMemoriesState`) holds the
M (+1 shared) memories ``[B, M(+1), H, K, V]``, the convolutions' last
``conv_size − 1`` inputs, the position and ``aux_loss``, the Switch-Transformer
load-balancing loss of the call's tokens::

    aux = M · Σ_m f_m · P_m,   f_m = (routing slots given to m) / (tokens · top_k),
                               P_m = mean over tokens of p_{t,m}

(1 for uniform router probabilities or perfectly balanced assignments; M when
every token goes to one memory with certainty). ``init_state`` reports 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.gates import mamba_decay_parameters, mamba_log_decay
from xformjax.nn.mixer import Mixer, OutputHead, position_of, register, split_heads
from xformjax.nn.norms import l2_normalize
from xformjax.nn.states import MixtureOfMemoriesState
from xformjax.nn.streams import init_conv_caches, silu_streams, stream_layers
from xformjax.ops.common.validation import Mode
from xformjax.ops.mixture_of_memories import mixture_of_memories

__all__ = ["MixtureOfMemories", "load_balance_loss", "top_k_routing"]


def top_k_routing(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits ``[..., M]`` → ``(weights, probs, selected)``.

    ``probs = softmax(logits)`` (float32 or wider); ``selected`` marks each
    token's ``top_k`` most probable memories; ``weights`` are ``probs`` on the
    selected memories renormalised to sum to 1, and exactly 0 elsewhere.
    """
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    top, indices = jax.lax.top_k(probs, top_k)
    selected = jnp.sum(jax.nn.one_hot(indices, probs.shape[-1], dtype=jnp.int32), -2) > 0
    weights = jnp.where(selected, probs, 0.0) / jnp.sum(top, -1, keepdims=True)
    return weights, probs, selected


def load_balance_loss(probs: jax.Array, selected: jax.Array) -> jax.Array:
    """Switch-Transformer load balance ``M · Σ_m f_m · P_m`` over all tokens given.

    Args:
      probs: ``[..., M]`` router probabilities of each token.
      selected: ``[..., M]`` boolean, the memories each token is routed to.

    ``f_m`` is the fraction of routing slots given to memory m (the slots of a
    token are its ``top_k`` choices, so ``Σ_m f_m = 1``) and ``P_m`` the mean
    probability of m. Gradients reach ``probs`` only (``f`` counts discrete
    choices). Returns a float32 scalar.
    """
    memories = probs.shape[-1]
    probs = probs.reshape(-1, memories).astype(jnp.float32)
    counts = jnp.sum(selected.reshape(-1, memories).astype(jnp.float32), 0)
    fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return memories * jnp.sum(fraction * jnp.mean(probs, 0))


@register("mom")
class MixtureOfMemories(Mixer):
    """Mixture-of-Memories (see the module docstring).

    ``config.num_memories`` routed memories, ``config.top_k`` per token, plus an
    always-on shared memory (index M) when ``config.shared_memory``.
    """

    modes = ("chunk", "parallel", "recurrent")

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        self.routed_memories = config.num_memories
        self.memories = config.num_memories + int(config.shared_memory)
        memories = self.memories
        # the router computes in float32 at least (as mixture-of-experts routers do):
        # its top-k choices should not flip with a bfloat16 computation dtype
        self.router = linear.Dense(
            d,
            config.num_memories,
            axes=("embed", None),
            rngs=rngs,
            sigma_reparam=config.sigma_reparam,
            dtype=jnp.promote_types(config.compute_dtype, jnp.float32),
            param_dtype=config.params_dtype,
        )
        self.projections, self.convs = stream_layers(config, memories, rngs)
        self.beta_proj = linear.dense(
            config, d, memories * heads, axes=("embed", "heads"), rngs=rngs, float_output=True
        )
        self.gate_proj = linear.dense(
            config, d, memories * heads, axes=("embed", "heads"), rngs=rngs, float_output=True
        )
        # Mamba-2 decay parameters, one per (memory, head), memory-major
        self.a_log, self.dt_bias = mamba_decay_parameters(
            config, memories * heads, layer_index, rngs
        )
        self.head = OutputHead(
            config,
            heads,
            config.value_dim,
            norm="rms",
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    # ----------------------------------------------------------------- state

    def memory_dtype(self):
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    def init_state(self, batch: int, max_len: int | None = None) -> MixtureOfMemoriesState:
        """Zero memories ``[B, M(+1), H, K, V]``, zero conv caches, position 0, aux_loss 0."""
        del max_len  # the memories do not grow with the sequence
        config = self.config
        memory = jnp.zeros(
            (batch, self.memories, config.num_heads, config.key_dim, config.value_dim),
            self.memory_dtype(),
        )
        return MixtureOfMemoriesState(
            memory=memory,
            position=jnp.zeros((), jnp.int32),
            conv=init_conv_caches(self.convs, batch, config.compute_dtype),
            aux_loss=jnp.zeros((), jnp.float32),
        )

    # ----------------------------------------------------------------- pieces

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x`` → ``(routing [B, T, M(+1)], aux_loss)``: renormalised top-k weights
        (1 for the shared memory) and the load-balancing loss of these tokens."""
        weights, probs, selected = top_k_routing(self.router(x), self.config.top_k)
        aux_loss = load_balance_loss(probs, selected)
        if self.config.shared_memory:
            weights = jnp.concatenate(
                [weights, jnp.ones(weights.shape[:-1] + (1,), weights.dtype)], -1
            )
        return weights, aux_loss

    def step_sizes_and_decays(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``β`` and ``log a`` (≤ 0), both ``[B, T, M(+1), H]`` in float32 or wider."""
        batch, length, _ = x.shape
        shape = (batch, length, self.memories, self.config.num_heads)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(dtype))
        if self.config.allow_neg_eigval:
            beta = 2.0 * beta
        log_decay = mamba_log_decay(self.gate_proj(x), self.a_log, self.dt_bias)
        return beta.reshape(shape), log_decay.reshape(shape)

    # ----------------------------------------------------------------- forward

    def __call__(
        self,
        x: jax.Array,
        *,
        state: MixtureOfMemoriesState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, MixtureOfMemoriesState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``; ``segment_ids``,
        ``positions`` ``[B, T]``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        packing = self.packing(x, state, segment_ids, positions)
        mode = self.resolve_mode(mode, x.shape[1])
        config = self.config
        batch, length, _ = x.shape
        heads, memories = config.num_heads, self.memories
        position = position_of(state)

        routing, aux_loss = self.route(x)
        streams, caches = silu_streams(
            self.projections, self.convs, x, None if state is None else state.conv, packing
        )
        q = l2_normalize(split_heads(streams["q"], heads))
        k = l2_normalize(streams["k"].reshape(batch, length, memories, heads, config.key_dim))
        v = streams["v"].reshape(batch, length, memories, heads, config.value_dim)
        beta, log_decay = self.step_sizes_and_decays(x)

        memory = None if state is None else state.memory
        o, final = mixture_of_memories(
            q,
            k,
            v,
            beta,
            routing,
            g=log_decay,
            resets=None if packing is None else packing.starts,
            initial_state=memory,
            output_final_state=True,
            mode=mode,
            chunk_size=config.chunk_size,
        )
        assert final is not None  # output_final_state=True
        y = self.head(o, x)
        new_state = MixtureOfMemoriesState(
            memory=final.astype(self.memory_dtype()),
            position=position + length,
            conv=caches,
            aux_loss=aux_loss,
        )
        return y, new_state

    def sequence_flops(self, seq_len: int) -> float:
        """Per token: the chunked gated delta rule of the ``top_k`` routed memories
        (plus the shared one) — intra-chunk ``QKᵀ``/``(·)V``, the WY/UT preparation,
        the state read-out, correction and update — and the routed mix of their
        outputs. The router's softmax/top-k is negligible.

        This is MoM's algorithmic cost; the present implementation runs the delta
        rule densely over all ``M(+1)`` memories (unrouted tokens as identity
        steps), i.e. ``(M + s)/(top_k + s)`` times this in practice.
        """
        config = self.config
        key_dim, value_dim = config.key_dim, config.value_dim
        chunk = min(config.chunk_size, seq_len)
        per_head = (
            2 * chunk * (key_dim + value_dim)
            + 4 * key_dim * value_dim
            + 2 * chunk * (2 * key_dim + value_dim)
            + 2 * key_dim * value_dim
        )
        active = config.top_k + int(config.shared_memory)
        return float(active * config.num_heads * (per_head + 2 * value_dim))
