"""Multi-scale retention ("Retentive Network", Sun et al. 2023).

    q_t, k_t = RoPE(x_t W_q), RoPE(x_t W_k);  v_t = x_t W_v
    S_t = γ_h S_{t-1} + k_t v_tᵀ,   γ_h = 1 − 2^{−5−h}  (h = 0 … H−1)
    o_t = S_tᵀ q_t / √D
    y_t = W_o · (SiLU(x_t W_g) ⊙ GroupNorm(o_t))

Each head has its own fixed decay (the "multi-scale" part); GroupNorm normalises
each head separately (here a LayerNorm over the head's value features; its affine
scale and bias are shared by the heads, where RetNet's GroupNorm has one per
channel). The parallel form is ``(QKᵀ ⊙ D)V`` with ``D_ij = γ^{i−j}``, the chunk
form RetNet's chunkwise recurrence. The paper uses values twice as wide as keys:
set ``expand_v=2``. With ``config.short_conv``, ``x W_q``, ``x W_k`` and ``x W_v`` each
pass through ``SiLU(conv(·))`` (a short causal convolution, as the delta-rule layers')
before RoPE.

Packed documents (``segment_ids``): RoPE rotates by each token's position in its
document, and the retention restarts at each document (the reset gate of
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer`; ``γ_h`` becomes a per-token gate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import register
from xformjax.nn.packing import Packing, token_positions_of
from xformjax.nn.positional import apply_rope
from xformjax.nn.recurrent import OpInputs, ShortConvMixer
from xformjax.nn.states import ConvMemoryState


def retnet_log_decay(num_heads: int) -> np.ndarray:
    """``log γ_h = log(1 − 2^{−5−h})``, float64 ``[H]``."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


@register("retnet")
class RetNet(ShortConvMixer):
    """Multi-scale retention (see the module docstring)."""

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        if config.key_dim % 2:
            raise ValueError(f"retnet needs an even head_dim for RoPE; got {config.key_dim}")
        self.standard_layers(rngs, norm="layer")
        self.add_short_convs(rngs)
        self.log_decay = tuple(retnet_log_decay(config.num_heads))

    def prepare(
        self,
        x: jax.Array,
        state: ConvMemoryState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        q, k, v, caches = self.conv_streams(x, state, packing)
        positions = token_positions_of(packing, position, x.shape[1])
        theta = self.config.rope_theta
        q, k = apply_rope(q, positions, base=theta), apply_rope(k, positions, base=theta)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        g = jnp.asarray(self.log_decay, dtype)
        return OpInputs(q, k, v, g=g, extra_state={"conv": caches})
