"""ATLAS: the Titans memory-as-a-layer mixer with the Omega rule, polynomial
features and the Muon memory optimiser.

"ATLAS: Learning to Optimally Memorize the Context at Test Time", Behrouz et al.
2025, built on "Titans: Learning to Memorize at Test Time", Behrouz et al. 2025.
Everything is as in Titans' MAL layer (:mod:`xformjax.nn.neural_memory`, the base of
both) except:

    φ(x) = Σ_{i=1}^{p} a_{h,i} x^{∘i}     (p = poly_degree; element-wise powers of the
                                          L2-normalised q, k; learned per-head a_i,
                                          initialised to 1/i!, the Taylor coefficients
                                          of exp; p = 1: φ = identity, no coefficients)
    γ_t = σ(x_t W_γ + b_γ)                (c > 1 only; c = 1 uses γ = 1)
    u_t = Σ_{i=t−c+1}^{t} γ_i ∇_W ½‖M_{W_{t-1}}(φ(k_i)) − v_i‖²      (c = omega_window)
    muon:     m_t = η_t m_{t-1} − u_t ;   W_t = (1 − α_t) W_{t-1} + θ_t NS(m_t)
    momentum: m_t = η_t m_{t-1} − θ_t u_t ;  W_t = (1 − α_t) W_{t-1} + m_t
    o_t = M_{W_t}(φ(q_t))

``NS`` is Muon's quintic Newton–Schulz iteration (``newton_schulz_steps``) applied to
each weight matrix's momentum (per head), every token. The paper's theory uses the
full monomial map ``[x^β]_{|β| ≤ p}`` (dimension ``O(K^p)``); this layer implements
the element-wise learnable polynomial above, which keeps the memory's input width
at ``K``. As in Titans, the chunk form with ``C > 1`` (every gradient of a chunk at
its start weights) is the paper's approximation, used in every mode, and decoding
reproduces it exactly (chunk-boundary state plus a buffer, a
:class:`~xformjax.nn.states.NeuralMemoryState`; see neural_memory.py). With
``omega_window = 1``, ``poly_degree = 1`` and ``memory_optimizer = "momentum"`` the
layer is exactly Titans' MAL layer (same parameters). Documents packed in a row
(``segment_ids``) are kept apart as there: each on its own chunk grid from the initial
memory, the Omega window cut at its first token (neural_memory.py). That is exact:
in float64 a packed document's outputs and gradients equal its own to rounding
(≈1e-14 relative). In float32 the layer's own rounding error is larger than Titans':
Muon's Newton–Schulz iterations amplify it (measured against float64 on a small layer:
outputs ≈1e-6 relative, a gate's summed gradient up to ≈3e-5), so two float32 runs of
the same document whose shapes differ — packed and alone — differ by about as much.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn.config import MemoryOptimizer, MixerConfig
from xformjax.nn.mixer import register
from xformjax.nn.neural_memory import NeuralMemoryMixer


@register("atlas")
class Atlas(NeuralMemoryMixer):
    """ATLAS (see the module docstring)."""

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        self.learned_gamma = config.omega_window > 1
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        degree = config.poly_degree
        self.poly = (
            nnx.Param(
                jnp.tile(
                    jnp.asarray(
                        [1.0 / math.factorial(i) for i in range(1, degree + 1)], config.params_dtype
                    ),
                    (config.num_heads, 1),
                ),
                out_sharding=("heads", None),
                eager_sharding=False,
            )
            if degree > 1
            else None
        )

    @property
    def omega_window(self) -> int:
        return self.config.omega_window

    @property
    def optimizer(self) -> MemoryOptimizer:
        return self.config.memory_optimizer

    def feature_map(self, x: jax.Array) -> jax.Array:
        """``φ(x) = Σ_i a_{h,i} x^{∘i}`` over ``x`` ``[B, T, H, K]``."""
        if self.poly is None:
            return x
        coefficients = self.poly[...].astype(x.dtype)  # [H, p]
        power, total = x, coefficients[:, 0, None] * x
        for i in range(1, coefficients.shape[1]):
            power = power * x
            total = total + coefficients[:, i, None] * power
        return total
