"""The delta-rule layers: DeltaNet, gated DeltaNet and DeltaProduct.

``deltanet`` ("Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", Yang et al. 2024), ``gated_deltanet`` ("Gated Delta Networks", Yang et al.
2025), ``deltaproduct`` ("DeltaProduct", Siems et al. 2025):

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))   (short causal conv)
    q, k   ← q/‖q‖, k/‖k‖  (per head);   β_t = σ(x_t W_β)  or  2σ(x_t W_β)  (allow_neg_eigval)
    deltanet:        S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    gated_deltanet:  S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,
                     log a_t = −exp(A_log)·softplus(x_t W_a + dt_bias)   (Mamba-2's gate)
    deltaproduct:    per token, n = num_householder delta steps with their own
                     k_{t,j}, v_{t,j}, β_{t,j}, after the decay a_t
    o_t = S_tᵀ q_t / √K;   y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

With β ∈ (0, 2) the transition ``I − β k kᵀ`` has an eigenvalue in (−1, 0) — the
negative-eigenvalue regime that lets these layers track state (parity).
The state holds the memory and the convolutions' last ``conv_size − 1`` inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.conv import ShortConv
from xformjax.nn.mixer import OutputHead, l2_normalize, register, split_heads
from xformjax.nn.recurrent import MatrixMemoryMixer, OpInputs

_STREAMS = ("q", "k", "v")


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


def stream_layers(config: MixerConfig, copies: int, rngs: nnx.Rngs,
                  conv_names: tuple[str, ...] = _STREAMS) -> tuple[nnx.Dict, nnx.Dict]:
    """The q (one per head) and k, v (``copies`` per head: DeltaProduct's steps, MoM's
    memories) projections, and the short causal convolutions of ``conv_names``
    (none without ``config.conv_size``)."""
    heads, d = config.num_heads, config.d_model
    widths = {"q": heads * config.key_dim, "k": copies * heads * config.key_dim,
              "v": copies * heads * config.value_dim}
    projections = nnx.Dict({name: linear.dense(config, d, widths[name], axes=("embed", "heads"),
                                               rngs=rngs)
                            for name in _STREAMS})
    convs = nnx.Dict({name: ShortConv(widths[name], config.conv_size, rngs=rngs,
                                      param_dtype=config.params_dtype)
                      for name in conv_names} if config.conv_size else {})
    return projections, convs


def silu_streams(projections: nnx.Dict, convs: nnx.Dict, x: jax.Array, state
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``SiLU(conv(x W))`` for q, k, v (flat widths) and the convolutions' new caches
    (state keys ``conv_q``, ``conv_k``, ``conv_v``)."""
    streams, caches = {}, {}
    for name in _STREAMS:
        y = projections[name](x)
        if name in convs:
            cache = None if state is None else state[f"conv_{name}"]
            y, caches[f"conv_{name}"] = convs[name](y, cache)
        streams[name] = jax.nn.silu(y)
    return streams, caches


def mamba_decay_parameters(config: MixerConfig, count: int, layer_index: int,
                           rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """``A_log`` (``A ~ U(1, 16)``) and ``dt_bias`` (``softplus⁻¹`` of ``dt`` log-uniform
    in [1e-3, 1e-1]) for ``count`` gates: Mamba-2's initialisation."""
    a = jax.random.uniform(rngs.params(), (count,), minval=1.0, maxval=16.0)
    a_log = nnx.Param(jnp.log(a).astype(config.params_dtype), out_sharding=("heads",),
                      eager_sharding=False)
    dt = np.exp(np.random.default_rng(layer_index).uniform(np.log(1e-3), np.log(1e-1), count))
    dt_bias = nnx.Param(jnp.asarray(_inverse_softplus(dt), config.params_dtype),
                        out_sharding=("heads",), eager_sharding=False)
    return a_log, dt_bias


def mamba_log_decay(gate: jax.Array, a_log: nnx.Param, dt_bias: nnx.Param) -> jax.Array:
    """``log a = −exp(A_log)·softplus(gate + dt_bias)`` (≤ 0) in float32 or wider;
    ``gate`` is ``x W_a`` ``[..., count]``."""
    dtype = jnp.promote_types(gate.dtype, jnp.float32)
    rate = jax.nn.softplus(gate.astype(dtype) + dt_bias[...])
    return -jnp.exp(a_log[...].astype(dtype)) * rate


class DeltaRuleMixer(MatrixMemoryMixer):
    """Shared body of the delta-rule layers; ``gated`` and ``steps`` pick the variant."""

    gated: bool = False
    op_kind = "delta"

    def __init__(self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1,
                 rngs: nnx.Rngs, steps: int = 1):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        self.steps = steps
        self.projections, self.convs = stream_layers(config, steps, rngs)
        self.beta_proj = linear.dense(config, d, steps * heads, axes=("embed", "heads"),
                                      rngs=rngs)
        if self.gated:
            self.gate_proj = linear.dense(config, d, heads, axes=("embed", "heads"), rngs=rngs)
            self.a_log, self.dt_bias = mamba_decay_parameters(config, heads, layer_index, rngs)
        self.head = OutputHead(config, heads, config.value_dim, norm="rms",
                               gate="silu" if config.output_gate else None, rngs=rngs)

    def init_extra_state(self, batch):
        return {f"conv_{name}": conv.init_cache(batch, self.config.compute_dtype)
                for name, conv in self.convs.items()}

    def log_decay(self, x: jax.Array) -> jax.Array:
        """``log a_t`` ``[B, T, H]``, ≤ 0 (gated variants)."""
        return mamba_log_decay(self.gate_proj(x), self.a_log, self.dt_bias)

    def prepare(self, x, state, position):
        batch, length, _ = x.shape
        heads, n = self.config.num_heads, self.steps
        streams, caches = silu_streams(self.projections, self.convs, x, state)
        q = l2_normalize(split_heads(streams["q"], heads))
        # sub-step j of token t is row t·n + j (token-major), as ops.delta_product expects
        k = l2_normalize(streams["k"].reshape(batch, length * n, heads, -1))
        v = streams["v"].reshape(batch, length * n, heads, -1)
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.promote_types(x.dtype, jnp.float32)))
        if self.config.allow_neg_eigval:
            beta = 2.0 * beta
        beta = beta.reshape(batch, length * n, heads)
        g = self.log_decay(x) if self.gated else None
        op = "delta" if n == 1 else "delta_product"
        return OpInputs(q, k, v, op=op, g=g, beta=beta, num_householder=n, extra_state=caches)


@register("deltanet")
class DeltaNet(DeltaRuleMixer):
    """DeltaNet (see the module docstring)."""


@register("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet: a data-dependent scalar decay before each delta step."""

    gated = True


@register("deltaproduct")
class DeltaProduct(DeltaRuleMixer):
    """Gated DeltaProduct with ``config.num_householder`` delta steps per token."""

    gated = True

    def __init__(self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1,
                 rngs: nnx.Rngs):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs,
                         steps=config.num_householder)
