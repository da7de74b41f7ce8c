"""The running softmax summary of Aaren and its associative combine.

A prefix of tokens with scalar scores ``s_i`` and values ``v_i`` is summarised by
the triple::

    m = max_i s_i                      (the running max; −inf for the empty prefix)
    u = Σ_i exp(s_i − m) · v_i         (the numerator, [V])
    w = Σ_i exp(s_i − m)               (the denominator)

so that the softmax-weighted mean of the prefix is ``u / w``. Two adjacent
prefixes combine as::

    (m_a, u_a, w_a) ⊕ (m_b, u_b, w_b) = (m, u_a·e^{m_a−m} + u_b·e^{m_b−m},
                                             w_a·e^{m_a−m} + w_b·e^{m_b−m}),   m = max(m_a, m_b)

``⊕`` is associative with the empty prefix ``(−inf, 0, 0)`` as identity, which
is what makes the prefix scan (``jax.lax.associative_scan``) exact. Packed
documents restart the summary: a token that begins a document carries a flag, and
the flagged pairs ``(summary, flag)`` combine as
``(a, f_a) ⊞ (b, f_b) = (b if f_b else a ⊕ b, f_a or f_b)`` — still associative (a
segmented scan), so every form restarts exactly, with no ``−inf`` arithmetic. When both
sides are empty the reference point ``m = −inf`` is masked before the
exponentials, so the result is ``(−inf, 0, 0)`` — never ``exp(−inf + inf) = NaN`` —
in the forward and the backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AarenState(NamedTuple):
    """The summary of the tokens seen so far, per batch row and head.

    Attributes:
      max: ``[B, H]`` the running max of the scores (``−inf`` when empty).
      numerator: ``[B, H, V]`` ``Σ_i exp(s_i − max) v_i``.
      denominator: ``[B, H]`` ``Σ_i exp(s_i − max)``.
    """

    max: jax.Array
    numerator: jax.Array
    denominator: jax.Array


def empty_state(batch: int, heads: int, value_dim: int, dtype) -> AarenState:
    """The summary of no tokens: ``(−inf, 0, 0)``, the identity of :func:`combine`."""
    return AarenState(
        jnp.full((batch, heads), -jnp.inf, dtype),
        jnp.zeros((batch, heads, value_dim), dtype),
        jnp.zeros((batch, heads), dtype),
    )


def combine(a: AarenState, b: AarenState) -> AarenState:
    """``a ⊕ b``: the summary of prefix ``a`` followed by prefix ``b``.

    Shapes broadcast: ``max``/``denominator`` ``[...]``, ``numerator`` ``[..., V]``.
    When both sides are empty (``m = −inf``) the reference point of the
    exponentials is masked to ``0`` *before* they are taken, so the factors are
    ``exp(−inf) = 0`` (the empty result), with finite gradients, instead of
    ``exp(−inf + inf) = NaN``. Otherwise it is ``m`` and one factor is exactly 1.
    """
    m = jnp.maximum(a.max, b.max)
    reference = jnp.where(jnp.isneginf(m), jnp.zeros_like(m), m)
    scale_a, scale_b = jnp.exp(a.max - reference), jnp.exp(b.max - reference)
    numerator = a.numerator * scale_a[..., None] + b.numerator * scale_b[..., None]
    return AarenState(m, numerator, a.denominator * scale_a + b.denominator * scale_b)


def token_summaries(scores: jax.Array, v: jax.Array) -> AarenState:
    """Each token on its own: ``(s_i, v_i, 1)`` (``exp(s_i − s_i) = 1``)."""
    return AarenState(scores, v, jnp.ones_like(scores))


def read_out(summary: AarenState) -> jax.Array:
    """The softmax-weighted mean ``u / w`` (``w ≥ 1`` once a token has been seen:
    the token holding the max contributes ``exp(0)``)."""
    return summary.numerator / summary.denominator[..., None]


def select(flag: jax.Array, a: AarenState, b: AarenState) -> AarenState:
    """``a`` where ``flag`` (``[...]``, like ``max``), else ``b``."""
    return AarenState(
        jnp.where(flag, a.max, b.max),
        jnp.where(flag[..., None], a.numerator, b.numerator),
        jnp.where(flag, a.denominator, b.denominator),
    )


def combine_segmented(
    a: tuple[AarenState, jax.Array], b: tuple[AarenState, jax.Array]
) -> tuple[AarenState, jax.Array]:
    """``(a, f_a) ⊞ (b, f_b)``: ``b`` alone if a document begins inside it, else
    ``a ⊕ b`` (module docstring); the flag says whether one begins in either."""
    (summary_a, flag_a), (summary_b, flag_b) = a, b
    return select(flag_b, summary_b, combine(summary_a, summary_b)), flag_a | flag_b
