"""Recurrent form of linear attention: one state update per token.

For every batch row and head, with ``a_t = exp(g_t) · exp(gk_t)`` (a K-vector)::

    S_t = diag(a_t) · S_{t-1} + k_t v_tᵀ        S: [K, V]
    o_t = S_tᵀ q_t                               (q is pre-scaled by the op)

The scan itself (packing, decoding steps) is ``xformjax.ops.common.token_scan``.
"""

from __future__ import annotations

import jax

from xformjax.ops.common.gates import LogGate
from xformjax.ops.common.token_scan import token_scan
from xformjax.ops.common.validation import Segments


def additive_update(
    decayed: jax.Array, k_t: jax.Array, v_t: jax.Array, beta_t: jax.Array | None
) -> jax.Array:
    """``S' + k vᵀ`` (``beta_t`` is unused: linear attention has no step size)."""
    del beta_t
    return decayed + k_t[..., :, None] * v_t[..., None, :]


def linear_attention_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token linear attention; arguments and results as
    :func:`xformjax.ops.common.token_scan.token_scan`."""
    return token_scan(additive_update, q, k, v, gate, initial_state, segments)
