"""Lightning attention as the TransNormerLLM layer ("TransNormerLLM", Qin et al. 2023;
"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
Attention", Qin et al. 2024).

    q_t, k_t = LRPE(SiLU(x_t W_q)), LRPE(SiLU(x_t W_k));  v_t = SiLU(x_t W_v)
    S_t = λ_h S_{t-1} + k_t v_tᵀ;   o_t = s·S_tᵀ q_t
    y_t = W_o · (SiLU(x_t W_u) ⊙ SRMSNorm(o_t))

The decay ``λ_h`` is fixed per head and layer. **Parameterisation followed**: the
released TransNormerLLM / lightning-attention code, ``log λ_h = −m_h · (1 − l/(L−1) +
10⁻⁵)`` with ``m_h`` ALiBi's geometric slopes (``m_h = 2^{−8(h+1)/H}`` for a power-of-two
``H``, interleaved otherwise) and ``l`` the layer index of ``L`` layers. The paper's text
writes the exponent as ``8h/H · (1 − l/L)``; we follow the code because it is what the
published checkpoints were trained with, and because the ``+10⁻⁵`` keeps the last
layer from becoming an undecayed (unbounded) cumulative sum. Early layers decay fast
(local), the last layers barely (global).

LRPE is the cosine form of TransNormerLLM's linearised relative positional encoding
(``xformjax.nn.positional.apply_lrpe``), which doubles the key dimension.

Where we differ from the paper's text, on purpose: SiLU is applied to ``v`` and to
the output gate ``u`` as well as to ``q, k`` (the paper writes ``V = XW_V`` and a
plain ``U = XW_U``; the activated forms train more stably at small scale here), and
the LRPE frequencies are RoPE's fixed geometric ones shared by all heads rather than
per-head ones.

Packed documents (``segment_ids``): LRPE rotates by each token's position in its
document, and the memory restarts at each document (the reset gate of
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer`; ``λ_h`` becomes a per-token gate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import register
from xformjax.nn.packing import Packing, token_positions_of
from xformjax.nn.positional import apply_lrpe
from xformjax.nn.recurrent import MatrixMemoryMixer, OpInputs


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes ``m_h`` (Press et al. 2022), float64 ``[H]``."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.array(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.array(power_of_two(closest) + extra)


def lightning_log_decay(num_heads: int, layer_index: int, num_layers: int) -> np.ndarray:
    """``log λ_h`` of one layer, float64 ``[H]`` (see the module docstring)."""
    depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
    return -alibi_slopes(num_heads) * (1.0 - depth + 1e-5)


@register("lightning")
class LightningAttention(MatrixMemoryMixer):
    """TransNormerLLM's linear attention with fixed per-head decay (module docstring)."""

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        self.standard_layers(rngs, norm="srms")
        self.log_decay = tuple(lightning_log_decay(config.num_heads, layer_index, num_layers))

    def memory_shape(self):
        return (self.config.num_heads, 2 * self.config.key_dim, self.config.value_dim)

    def prepare(self, x, state, position, packing: Packing | None = None):
        q, k, v = (jax.nn.silu(a) for a in self.qkv(x))
        positions = token_positions_of(packing, position, x.shape[1])
        q, k = apply_lrpe(q, positions), apply_lrpe(k, positions)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        return OpInputs(q, k, v, g=jnp.asarray(self.log_decay, dtype))
