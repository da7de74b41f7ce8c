"""Chunked form of linear attention: lightning-attention-2 tiling, linear in T.

Split the sequence into chunks of ``C`` tokens. Inside chunk ``n`` let
``b_i = Σ_{s ≤ i} log a_s`` (cumulative log decay from the chunk start, ≤ 0).
Then, with ``S_n`` the state entering the chunk::

    intra:  O_intra = (Q Kᵀ ⊙ exp(b_i − b_j) [j ≤ i]) V            (masked before exp)
    inter:  O_inter = (Q ⊙ exp(b)) S_n
    carry:  S_{n+1} = exp(b_C) ⊙ S_n + (K ⊙ exp(b_C − b))ᵀ V

The chunk's update ``(K ⊙ exp(b_C − b))ᵀ V`` does not depend on ``S_n``, so it is
computed for every chunk of a block at once; this module is that rule. The
blocked scan, packing and final states are the shared engine
(``xformjax.ops.common.chunk_scan``); the per-channel gate's intra-chunk scores
are ``xformjax.ops.common.channel_scores``. Scalar gates use the hand-written
backward of ``chunk_backward.py``; the per-channel gate (GLA) JAX's, with each
block rematerialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.common.chunk_scan import ChunkRule, ChunkTiles, chunk_scan
from xformjax.ops.common.gates import LogGate
from xformjax.ops.common.validation import Segments
from xformjax.ops.linear_attention.chunk_backward import make_backward_step


def _prepare(tiles: ChunkTiles) -> tuple[jax.Array, ...]:
    """Every chunk's state update ``(K ⊙ e^{b_C − b})ᵀ V``, ``[B, H, G, K, V]``."""
    return (jnp.einsum("bhnck,bhncv->bhnkv", tiles.k_to_end, tiles.v),)


def _transition(state: jax.Array, prepared: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
    """The precomputed update; the values stay ``V``."""
    del state
    return prepared[0], None


LINEAR_ATTENTION = ChunkRule("linear_attention", _prepare, _transition, make_backward_step)


def linear_attention_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: LogGate,
    initial_state: jax.Array | None,
    segments: Segments | None,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Chunked linear attention; arguments and results as the recurrent form.

    Args:
      q, k: ``[B, T, H, K]`` (``q`` already scaled); v: ``[B, T, H, V]``;
      gate: the log decay; initial_state ``[N, H, K, V]`` or ``None``; segments:
      the packing, or ``None``; chunk_size: ``C``.

    Returns:
      ``o [B, T, H, V]`` and the final states ``[N, H, K, V]``.
    """
    return chunk_scan(LINEAR_ATTENTION, q, k, v, gate, initial_state, segments, chunk_size)
