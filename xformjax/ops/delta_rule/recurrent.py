"""Recurrent form of the delta rule: one state update per token.

For every batch row and head, with ``a_t = exp(g_t) · exp(gk_t)`` (a K-vector)::

    S'  = diag(a_t) · S_{t-1}
    S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ          S: [K, V]
    o_t = S_tᵀ q_t                               (q is pre-scaled by the op)

The scan itself (packing, decoding steps) is ``xformjax.ops.common.token_scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.gates import LogGate
from xformjax.ops.common.token_scan import token_scan
from xformjax.ops.common.validation import Segments


def delta_update(
    decayed: jax.Array, k_t: jax.Array, v_t: jax.Array, beta_t: jax.Array | None
) -> jax.Array:
    """``S' + β k (v − S'ᵀk)ᵀ``."""
    assert beta_t is not None
    v_t = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", decayed, k_t))
    return decayed + k_t[..., :, None] * v_t[..., None, :]


def delta_rule_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token delta rule; arguments and results as
    :func:`xformjax.ops.common.token_scan.token_scan`, with ``beta [B, T, H]``."""
    return token_scan(delta_update, q, k, v, gate, initial_state, segments, beta=beta)
