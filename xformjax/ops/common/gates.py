"""The log-decay gate of a linear-attention state, in one of three layouts.

``S_t = exp(g_t) · diag(exp(gk_t)) · S_{t-1} + k_t v_tᵀ`` is driven by a
natural-log decay that is, per step and head,

* ``"head"``: a constant per head, ``[H]`` (RetNet, lightning attention; also
  the ungated case with zeros) — never broadcast to ``[B, T, H]``;
* ``"token"``: a scalar per token and head, ``[B, T, H]`` (Mamba2-style);
* ``"channel"``: one per key channel, ``[B, T, H, K]`` (GLA); ``g`` and ``gk``
  given together are summed into this layout (their exponentials multiply).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp

#: The log-decay that wipes a state (a document's first token in a packed row): ``exp``
#: gives exactly 0 in float32 and bfloat16, yet it is finite, so differences of
#: (compensated) log-decay sums never become ``inf − inf``; sums of 10⁸ stay finite.
RESET_LOG_GATE = -1e30

#: The layout of a gate: per head ``[H]``, per token ``[B, T, H]``, per channel ``[B, T, H, K]``.
GateKind = Literal["head", "token", "channel"]
KINDS: tuple[GateKind, ...] = get_args(GateKind)


@dataclasses.dataclass(frozen=True)
class LogGate:
    """A log-space decay (values ≤ 0) and the layout it is stored in."""

    kind: GateKind
    values: jax.Array

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LogGate.kind must be one of {KINDS}; got {self.kind!r}")


def combine(g: jax.Array | None, gk: jax.Array | None, num_heads: int, dtype: jnp.dtype) -> LogGate:
    """Fold the op's ``g`` ([H] or [B,T,H]) and ``gk`` ([B,T,H,K]) into one gate."""
    if gk is not None:
        total = gk.astype(dtype)
        if g is not None:
            g = g.astype(dtype)
            total = total + (g[:, None] if g.ndim == 1 else g[..., None])
        return LogGate("channel", total)
    if g is None:
        return LogGate("head", jnp.zeros((num_heads,), dtype))
    g = g.astype(dtype)
    return LogGate("head" if g.ndim == 1 else "token", g)
