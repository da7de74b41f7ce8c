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
                     k_{t,j}, v_{t,j}, β_{t,j}, after the decay a_t; one projection
                     each for k, v and β, step-major: sub-step j's features are
                     [j·H·K, (j+1)·H·K) of the projection (heads inside)
    o_t = S_tᵀ q_t / √K;   y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

With β ∈ (0, 2) the transition ``I − β k kᵀ`` has an eigenvalue in (−1, 0) — the
negative-eigenvalue regime that lets these layers track state (parity).
The state (:class:`~xformjax.nn.states.DeltaRuleState`) holds the memory and the
convolutions' last ``conv_size − 1`` inputs.

Packed documents (``segment_ids``): the short convolutions do not read across a
document boundary, and the memory restarts at each document through the reset gate of
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer` (DeltaNet's ``g`` is then the reset
alone; DeltaProduct's lands on the token's first Householder step).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.gates import mamba_decay_parameters, mamba_log_decay
from xformjax.nn.mixer import OutputHead, register, split_heads
from xformjax.nn.norms import l2_normalize
from xformjax.nn.packing import Packing
from xformjax.nn.recurrent import MatrixMemoryMixer, OpInputs
from xformjax.nn.states import DeltaRuleState
from xformjax.nn.streams import init_conv_caches, silu_streams, stream_layers


class DeltaRuleMixer(MatrixMemoryMixer):
    """Shared body of the delta-rule layers; ``gated`` and ``steps`` pick the variant."""

    gated: ClassVar[bool] = False
    op_kind = "delta"
    state_type = DeltaRuleState

    def __init__(
        self,
        config: MixerConfig,
        *,
        layer_index: int = 0,
        num_layers: int = 1,
        rngs: nnx.Rngs,
        steps: int = 1,
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        self.steps = steps
        self.projections, self.convs = stream_layers(config, steps, rngs)
        # β and the decay gate are computed in float32: their projections return float32
        self.beta_proj = linear.dense(
            config, d, steps * heads, axes=("embed", "heads"), rngs=rngs, float_output=True
        )
        if self.gated:
            self.gate_proj = linear.dense(
                config, d, heads, axes=("embed", "heads"), rngs=rngs, float_output=True
            )
            self.a_log, self.dt_bias = mamba_decay_parameters(config, heads, layer_index, rngs)
        self.head = OutputHead(
            config,
            heads,
            config.value_dim,
            norm="rms",
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    def init_extra_state(self, batch: int) -> dict[str, object]:
        return {"conv": init_conv_caches(self.convs, batch, self.config.compute_dtype)}

    def log_decay(self, x: jax.Array) -> jax.Array:
        """``log a_t`` ``[B, T, H]``, ≤ 0 (gated variants)."""
        return mamba_log_decay(self.gate_proj(x), self.a_log, self.dt_bias)

    def prepare(
        self,
        x: jax.Array,
        state: DeltaRuleState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        batch, length, _ = x.shape
        heads, n = self.config.num_heads, self.steps
        streams, caches = silu_streams(
            self.projections, self.convs, x, None if state is None else state.conv, packing
        )
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
        return OpInputs(
            q, k, v, op=op, g=g, beta=beta, num_householder=n, extra_state={"conv": caches}
        )


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

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(
            config,
            layer_index=layer_index,
            num_layers=num_layers,
            rngs=rngs,
            steps=config.num_householder,
        )
