"""Titans MAL (memory as a layer): the neural memory is the mixer.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025. With ``q, k, v``
from short causal convolutions of the input (SiLU, per-head L2 norm) and the
gates ``θ_t, η_t, α_t = σ(x_t W + b)``:

    m_t = η_t m_{t-1} − θ_t ∇_W ½‖M_{W_{t-1}}(k_t) − v_t‖² ;   W_t = (1 − α_t) W_{t-1} + m_t
    o_t = M_{W_t}(q_t);   y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

Everything — the chunked training form, decoding from the chunk-boundary state
plus a buffer, the state (:class:`~xformjax.nn.states.NeuralMemoryState`) — is
:class:`~xformjax.nn.neural_memory.NeuralMemoryMixer`'s; this class only names the
variant.
"""

from __future__ import annotations

from xformjax.nn.titans.base import Titans


class TitansMAL(Titans):
    """Titans, memory as a layer (``titans_variant="mal"``; module docstring)."""

    variant = "mal"
