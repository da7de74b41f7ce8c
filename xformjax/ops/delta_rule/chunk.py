"""Chunked delta rule: the WY/UT representation per chunk, linear in T.

Per chunk, with ``b`` the log decay accumulated from the chunk start,
``Γ_ij = e^{b_i − b_j}[j ≤ i]`` and ``S`` the entering state::

    A = tril(diag(β)(K Kᵀ ⊙ Γ), −1),   T = (I + A)⁻¹                 (inverse.py)
    W = T diag(β)(K ⊙ e^b),   U₀ = T diag(β) V                       (batched over chunks)
    U = U₀ − W S                                                      (pseudo-values)
    O = (Q Kᵀ ⊙ Γ) U + (Q ⊙ e^b) S,   S' = e^{b_C} S + (K ⊙ e^{b_C − b})ᵀ U

so the delta rule is linear attention with the values ``V`` replaced by ``U``,
which depend on the entering state: that is the only part of the inner scan
over chunks that is sequential. ``A`` is built like the scores, every exponent
≤ 0. The engine (``xformjax.ops.common.chunk_scan``) runs it; scalar gates use
the hand-written backward of ``chunk_backward.py``, the per-channel gate (KDA)
JAX's, with each block rematerialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_algebra import gate_scores
from xformjax.ops.common.chunk_scan import ChunkRule, ChunkTiles, chunk_scan
from xformjax.ops.common.gates import LogGate
from xformjax.ops.common.validation import Segments
from xformjax.ops.delta_rule.chunk_backward import make_backward_step
from xformjax.ops.delta_rule.inverse import unit_lower_inverse


def _prepare(tiles: ChunkTiles) -> tuple[jax.Array, ...]:
    """``W``, ``U₀`` and ``K ⊙ e^{b_C − b}`` for every chunk of a block."""
    assert tiles.beta is not None
    size = tiles.k.shape[-2]
    strictly = jnp.tril(jnp.ones((size, size), bool), -1)
    a = jnp.where(strictly, gate_scores(tiles.k, tiles.k, tiles.b, tiles.kind), 0.0) * tiles.beta
    transform = unit_lower_inverse(a)  # [B, H, G, C, C]
    w = jnp.einsum("bhnij,bhnjk->bhnik", transform, tiles.beta * tiles.k * tiles.decay_in)
    u0 = jnp.einsum("bhnij,bhnjv->bhniv", transform, tiles.beta * tiles.v)
    return w, u0, tiles.k_to_end


def _transition(state: jax.Array, prepared: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """``U = U₀ − W S`` and the update ``(K ⊙ e^{b_C − b})ᵀ U`` of one chunk."""
    w, u0, k_to_end = prepared
    values = u0 - jnp.einsum("bhck,bhkv->bhcv", w, state)
    return jnp.einsum("bhck,bhcv->bhkv", k_to_end, values), values


DELTA_RULE = ChunkRule("delta_rule", _prepare, _transition, make_backward_step)


def delta_rule_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """The chunked delta rule.

    Args:
      q, k: ``[B, T, H, K]`` (``q`` already scaled); v: ``[B, T, H, V]``;
      beta: ``[B, T, H]``; gate: the log decay; initial_state ``[N, H, K, V]`` or
      ``None``; segments: the packing, or ``None``; chunk_size: ``C``.

    Returns:
      ``o [B, T, H, V]`` and the final states ``[N, H, K, V]``.
    """
    return chunk_scan(DELTA_RULE, q, k, v, gate, initial_state, segments, chunk_size, beta=beta)
