"""Gated linear attention ("Gated Linear Attention Transformers with
Hardware-Efficient Training", Yang et al. 2024).

    q_t, k_t, v_t = x_t W_q, x_t W_k, x_t W_v
    α_t = σ(x_t W_α¹ W_α² + b)^{1/τ}          (per key channel; low-rank W_α, τ = 16)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ;   o_t = S_tᵀ q_t / √K
    y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

The gate enters the op in log space, ``log α_t = logσ(·)/τ ≤ 0``; the chunk form
uses secondary chunking so no exponent is ever positive. With ``config.short_conv``,
``x W_q``, ``x W_k`` and ``x W_v`` each pass through ``SiLU(conv(·))`` (a short causal
convolution, as the delta-rule layers'; flash-linear-attention's ``use_short_conv``).

Packed documents (``segment_ids``): the state restarts at each document through a
per-token reset gate ``g`` that the op adds to ``log α_t`` (see
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer`).
"""

from __future__ import annotations

import jax
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import register, split_heads
from xformjax.nn.packing import Packing
from xformjax.nn.recurrent import OpInputs, ShortConvMixer
from xformjax.nn.states import ConvMemoryState


@register("gla")
class GatedLinearAttention(ShortConvMixer):
    """GLA with data-dependent per-channel gates (see the module docstring)."""

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, dim = config.num_heads, config.key_dim
        self.standard_layers(rngs, norm="rms")
        self.add_short_convs(rngs)
        self.gate_down = linear.dense(
            config, config.d_model, config.gate_low_rank, axes=("embed", None), rngs=rngs
        )
        self.gate_up = linear.dense(
            config,
            config.gate_low_rank,
            heads * dim,
            axes=(None, "heads"),
            use_bias=True,
            rngs=rngs,
            float_output=True,  # the log-sigmoid gate is computed in float32
        )

    def log_gate(self, x: jax.Array) -> jax.Array:
        """``log α_t`` ``[B, T, H, K]``, ≤ 0, in ``promote(compute dtype, float32)``."""
        logits = self.gate_up(self.gate_down(x))
        return split_heads(
            jax.nn.log_sigmoid(logits) / self.config.gate_temperature, self.config.num_heads
        )

    def prepare(
        self,
        x: jax.Array,
        state: ConvMemoryState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        q, k, v, caches = self.conv_streams(x, state, packing)
        return OpInputs(q, k, v, gk=self.log_gate(x), extra_state={"conv": caches})
