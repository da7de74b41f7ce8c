"""Data-dependent decay gates shared by the gated delta-rule layers.

Mamba-2's scalar decay (used by gated DeltaNet, DeltaProduct and each memory of
Mixture-of-Memories), per gate ``i`` of ``count``:

    log a_t = −exp(A_log_i) · softplus(x_t W_a + dt_bias_i)   (≤ 0)

with Mamba-2's initialisation ``A ~ U(1, 16)`` and ``dt = softplus(dt_bias)``
log-uniform in ``[1e-3, 1e-1]``. The layer owns the projection ``W_a``; this
module owns the two parameter vectors and the formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xformjax.nn.config import MixerConfig


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


def mamba_decay_parameters(
    config: MixerConfig, count: int, layer_index: int, rngs: nnx.Rngs
) -> tuple[nnx.Param, nnx.Param]:
    """``A_log`` (``A ~ U(1, 16)``) and ``dt_bias`` (``softplus⁻¹`` of ``dt`` log-uniform
    in [1e-3, 1e-1]) for ``count`` gates: Mamba-2's initialisation."""
    a = jax.random.uniform(rngs.params(), (count,), minval=1.0, maxval=16.0)
    a_log = nnx.Param(
        jnp.log(a).astype(config.params_dtype), out_sharding=("heads",), eager_sharding=False
    )
    dt = np.exp(np.random.default_rng(layer_index).uniform(np.log(1e-3), np.log(1e-1), count))
    dt_bias = nnx.Param(
        jnp.asarray(_inverse_softplus(dt), config.params_dtype),
        out_sharding=("heads",),
        eager_sharding=False,
    )
    return a_log, dt_bias


def mamba_log_decay(gate: jax.Array, a_log: nnx.Param, dt_bias: nnx.Param) -> jax.Array:
    """``log a = −exp(A_log)·softplus(gate + dt_bias)`` (≤ 0) in float32 or wider;
    ``gate`` is ``x W_a`` ``[..., count]``."""
    dtype = jnp.promote_types(gate.dtype, jnp.float32)
    rate = jax.nn.softplus(gate.astype(dtype) + dt_bias[...])
    return -jnp.exp(a_log[...].astype(dtype)) * rate
