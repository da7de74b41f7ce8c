"""Per-chunk primitives both chunked families share: log-gate prefix sums, decay
masks, state decays and row dot products.

Inside a chunk, ``b_i = Σ_{s ≤ i} log a_s`` is the log decay accumulated from the
chunk start (≤ 0), and ``b_C − b_i`` the log decay from token ``i`` to the chunk's
end. Their layout follows the gate's kind (:mod:`.gates`):

* ``"head"``: ``[H, C]`` (one constant per head; the same for every chunk);
* ``"token"``: ``[B, H, G, C]``;
* ``"channel"``: ``[B, H, G, C, K]``.

Precision: ``b`` is kept as an unevaluated float pair ``hi + lo`` (a compensated
prefix sum, :class:`LogDecay`), and every difference ``b_i − b_j`` is formed as
``(hi_i − hi_j) + (lo_i − lo_j)``. A plain float32 prefix sum loses the weak gates
next to a strong one: after a gate of −1e4 both ``b_i`` and ``b_j`` are ≈ −1e4,
their spacing is 1e-3, and ``exp(b_i − b_j)`` for the small gates between them
was off by up to 1e-3 relative. With the pair, ``hi_i − hi_j`` is exact when the
two are close (Sterbenz) and the residues carry what the rounding dropped, so the
difference is accurate to ``≈ eps·|b_i − b_j|`` whatever came before ``j``.

:func:`expand` broadcasts any layout against head-major ``[B, H, G, C, K]``
tiles, and every exponent formed here is masked before ``exp`` and ≤ 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp

# `kernels/` is installed as xformjax.kernels (package-dir mapping; pyright cannot see it).
from xformjax.kernels.gates import compensated_prefix_sum  # pyright: ignore[reportMissingImports]
from xformjax.ops.common.channel_scores import channel_gate_scores
from xformjax.ops.common.gates import GateKind


def cumulative_sum(x: jax.Array, axis: int) -> jax.Array:
    """Inclusive prefix sum of ``x`` along ``axis`` (a chunk's log decays ``b``).

    An associative scan rather than ``jnp.cumsum``: XLA:CPU (jaxlib 0.10) splits
    ``cumsum`` into two ``reduce-window``s and fuses their final add into every
    consumer, so the ``[C, C]`` decay mask ``exp(b_i − b_j)`` recomputed it through
    reshaped indices for each element: 200 µs instead of 50 µs on ``[4, 8, 64]``.
    """
    return jax.lax.associative_scan(jnp.add, x, axis=axis % x.ndim)


def reverse_cumulative_sum(x: jax.Array, axis: int) -> jax.Array:
    """``Σ_{s ≥ t} x_s`` along ``axis``, as ``cumulative_sum``."""
    return jax.lax.associative_scan(jnp.add, x, axis=axis % x.ndim, reverse=True)


def row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Σ_d a[..., d]·b[..., d]`` (broadcasting the leading axes), as a ``dot_general``.

    Not ``jnp.sum(a * b, axis=-1)``: XLA:CPU (jaxlib 0.10) hands a fused
    multiply-then-reduce to YNNPACK, which ran it 7× slower than this dot on
    ``[4, 8, 64, 64]`` rows (300 µs against 45 µs); in the delta rule's
    backward three such sums took a fifth of the time.
    """
    return jnp.einsum("...d,...d->...", a, b)


def shift_forward(x: jax.Array, axis: int) -> jax.Array:
    """``x`` moved one step along ``axis`` (``out_t = x_{t−1}``, ``out_0 = 0``): an
    inclusive prefix sum of ``x`` becomes an exclusive one."""
    axis %= x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[axis], axis=axis)


class LogDecay(NamedTuple):
    """``b`` inside each chunk as the pair ``hi + lo``, and ``to_end = b_C − b``.

    All three share the layout of the kind (module docstring); :func:`log_decays`
    makes them, :func:`difference` subtracts two of them.
    """

    hi: jax.Array
    lo: jax.Array
    to_end: jax.Array

    def value(self) -> jax.Array:
        """``b`` rounded to one float (for ``exp(b)``, which needs no more)."""
        return self.hi + self.lo

    def last(self, kind: GateKind) -> jax.Array:
        """``b_C``, keeping the C axis (length 1): the decay across the whole chunk."""
        b = self.value()
        return b[..., -1:, :] if kind == "channel" else b[..., -1:]

    def expand(self, kind: GateKind) -> LogDecay:
        """All three broadcast against ``[B, H, G, C, K]`` (see :func:`expand`)."""
        return LogDecay(*(expand(x, kind) for x in self))


def difference(hi_i: jax.Array, lo_i: jax.Array, hi_j: jax.Array, lo_j: jax.Array) -> jax.Array:
    """``b_i − b_j`` from two pairs, as ``(hi_i − hi_j) + (lo_i − lo_j)`` (broadcasting)."""
    return (hi_i - hi_j) + (lo_i - lo_j)


def _log_decay_values(log_a: jax.Array, axis: int) -> LogDecay:
    hi, lo = compensated_prefix_sum(log_a, axis)
    size = log_a.shape[axis]
    last = lambda x: jax.lax.slice_in_dim(x, size - 1, size, axis=axis)
    # Materialised once, so XLA cannot fuse the scan into each consumer and redo it
    # per element of the [C, C] masks (a guard: no time difference measured on CPU).
    return LogDecay(*jax.lax.optimization_barrier((hi, lo, difference(last(hi), last(lo), hi, lo))))


def log_decays(log_a: jax.Array, axis: int) -> LogDecay:
    """The compensated prefix sums of a chunk's log gates along ``axis``.

    ``hi + lo = b_i = Σ_{s ≤ i} log_a_s`` to ``≈ eps²·Σ|log_a|`` (a TwoSum prefix
    scan), and ``to_end_i = b_C − b_i = Σ_{s > i} log_a_s``.

    VJP: ``hi`` and ``lo`` only ever enter through ``hi + lo`` (their cotangents
    are equal), so ``d log_a_s = Σ_{i ≥ s} d hi_i + Σ_{i < s} d to_end_i``: the
    second sum runs over the terms ``to_end_i`` holds ``log_a_s`` in, rather than
    as ``d b_C − d b_i``, which cancels when the decay to the end is strong.
    """
    return cast(LogDecay, _compensated_log_decays(log_a, axis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _compensated_log_decays(log_a: jax.Array, axis: int) -> LogDecay:
    return _log_decay_values(log_a, axis)


def _log_decays_fwd(log_a, axis):
    return _log_decay_values(log_a, axis), None


def _log_decays_bwd(axis, _, cotangents):
    d_hi, _d_lo, d_to_end = cotangents
    d_log_a = reverse_cumulative_sum(d_hi, axis) + shift_forward(
        cumulative_sum(d_to_end, axis), axis
    )
    return (d_log_a,)


_compensated_log_decays.defvjp(_log_decays_fwd, _log_decays_bwd)


def chunk_log_decay(
    kind: GateKind, head_gate: jax.Array | None, log_a: jax.Array | None, chunk_size: int
) -> LogDecay:
    """``b`` inside each chunk: head ``[H, C]`` from the ``[H]`` gate; token
    ``[B, H, G, C]`` and channel ``[B, H, G, C, K]`` from ``log_a``, the block's
    gate in head-major layout."""
    if kind == "head":
        assert head_gate is not None
        steps = jnp.broadcast_to(head_gate[:, None], (head_gate.shape[0], chunk_size))
        return log_decays(steps, 1)
    assert log_a is not None
    return log_decays(log_a, 3)


def expand(b: jax.Array, kind: GateKind) -> jax.Array:
    """Broadcast ``b`` (or a slice of it, keeping the C axis) against ``[B, H, G, C, K]``."""
    if kind == "head":
        return b[None, :, None, :, None]
    return b[..., None] if kind == "token" else b


def chunk_decays(b: LogDecay, kind: GateKind) -> jax.Array | None:
    """``exp(b_C)`` of every chunk of a block, chunk-major for the inner scan:
    token ``[G, B, H]``, channel ``[G, B, H, K]``; ``None`` for a head gate (the
    same for every chunk: see :func:`head_chunk_decay`)."""
    if kind == "head":
        return None
    last = b.last(kind)
    return jnp.moveaxis(jnp.exp(last[..., 0, :] if kind == "channel" else last[..., 0]), 2, 0)


def head_chunk_decay(head_gate: jax.Array | None, chunk_size: int) -> jax.Array | None:
    """``exp(C·g)``, the ``[H]`` decay across one chunk of a head gate (else ``None``)."""
    return None if head_gate is None else jnp.exp(head_gate * chunk_size)


def scalar_decay_mask(b: LogDecay, kind: GateKind) -> jax.Array:
    """``M_ij = exp(b_i − b_j)[j ≤ i]``, masked before ``exp``: ``[B|1, H, G|1, C, C]``."""
    size = b.hi.shape[-1]
    causal = jnp.tril(jnp.ones((size, size), bool))
    column = lambda x: x[..., :, None]
    row = lambda x: x[..., None, :]
    log_decay = difference(column(b.hi), column(b.lo), row(b.hi), row(b.lo))
    if kind == "head":
        log_decay = log_decay[None, :, None]
    return jnp.exp(jnp.where(causal, log_decay, -jnp.inf))


def straddling_sums(pairs: jax.Array) -> jax.Array:
    """``D_t = Σ_{i ≥ t > j} P_ij`` of ``[.., C, C]`` pair terms: ``[.., C]``.

    The gradient of a log gate ``log a_t`` collects the pairs of a chunk whose
    decay ``exp(b_i − b_j)`` holds it (``j < t ≤ i``). Summed directly, nothing
    cancels; as ``Σ_{u ≥ t} (row sum − column sum)_u`` the pairs with both ends
    at or after ``t`` (the diagonal first) cancel, leaving float32 rounding of
    ``O(1)`` where the true value is ``O(exp(b_t − b_{t−1}))`` under strong decay.
    """
    size = pairs.shape[-1]
    before = jnp.triu(jnp.ones((size, size), pairs.dtype), 1)  # [j, t]: j < t
    prefix = jnp.einsum("...ij,jt->...it", pairs, before)  # Σ_{j<t} P_it
    at_or_after = jnp.tril(jnp.ones((size, size), bool))  # [i, t]: i ≥ t
    return jnp.sum(jnp.where(at_or_after, prefix, 0.0), axis=-2)


RowTerms = tuple[tuple[jax.Array, jax.Array], ...]


def scalar_gate_gradient(
    kind: GateKind,
    pairs: jax.Array,
    from_start: RowTerms,
    to_end: RowTerms,
    leaving: jax.Array,
) -> jax.Array:
    """The cotangent of a scalar gate from the terms each ``log a_t`` of a chunk sits in.

    Args:
      kind: ``"token"`` (returns ``[B, H, G, C]``, one per token) or ``"head"``
        (returns ``[H]``, the sum over tokens, never formed per token).
      pairs: ``[B, H, G, C, C]`` terms ``P_ij`` under the decay ``exp(b_i − b_j)``:
        they hold the gates ``j < t ≤ i``.
      from_start: ``(x, dx)`` tiles ``[B, H, G, C, D]`` whose rows carry ``exp(b_i)``
        (gates ``t ≤ i``): row terms ``x_i·dx_i``.
      to_end: the same for rows carrying ``exp(b_C − b_j)`` (gates ``t > j``).
      leaving: ``[B, H, G]`` terms carrying ``exp(b_C)`` (every gate of the chunk).

    Each sum runs over the terms a gate is in, so nothing cancels (see
    :func:`straddling_sums`).
    """
    size = pairs.shape[-1]
    index = jnp.arange(size)
    if kind == "head":  # Σ_t: a pair holds i − j gates, a row i + 1 or C − 1 − j, `leaving` C

        def weighted(terms: RowTerms, weights: jax.Array) -> jax.Array:
            total = jnp.zeros(pairs.shape[1:2], pairs.dtype)
            for x, dx in terms:
                total = total + jnp.einsum("bhnck,bhnck->h", x * weights[:, None], dx)
            return total

        span = jnp.maximum(index[:, None] - index[None, :], 0).astype(pairs.dtype)
        return (
            jnp.einsum("bhnij,ij->h", pairs, span)
            + weighted(from_start, (index + 1).astype(pairs.dtype))
            + weighted(to_end, (size - 1 - index).astype(pairs.dtype))
            + size * jnp.einsum("bhn->h", leaving)
        )

    def rows(terms: RowTerms) -> jax.Array:
        total = jnp.zeros(pairs.shape[:-1], pairs.dtype)
        for x, dx in terms:
            total = total + row_dot(x, dx)
        return total

    return (
        straddling_sums(pairs)
        + reverse_cumulative_sum(rows(from_start), axis=-1)
        + shift_forward(cumulative_sum(rows(to_end), axis=-1), axis=-1)
        + leaving[..., None]
    )


def gate_scores(x: jax.Array, y: jax.Array, b: LogDecay, kind: GateKind) -> jax.Array:
    """``A_ij = Σ_k x_ik y_jk exp(b_i − b_j)`` for ``j ≤ i`` (0 above): ``[B, H, G, C, C]``.

    ``x``, ``y`` are head-major ``[B, H, G, C, K]`` tiles; a per-channel gate goes
    through :func:`.channel_scores.channel_gate_scores` (its own VJP).
    """
    if kind == "channel":
        return channel_gate_scores(x, y, b.hi, b.lo)
    return jnp.einsum("bhnik,bhnjk->bhnij", x, y) * scalar_decay_mask(b, kind)


def decay_state(state: jax.Array, kind: GateKind, decay: jax.Array) -> jax.Array:
    """Multiply ``[B, H, K, V]`` by a per-head ``[H]``, ``[B, H]`` or ``[B, H, K]`` decay."""
    if kind == "head":
        return state * decay[None, :, None, None]
    return state * (decay[..., None, None] if kind == "token" else decay[..., None])
