"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and a
repetition penalty.

:class:`SamplingOptions` holds the settings (a frozen, validated dataclass);
:func:`process_logits` applies them to logits ``[B, V]`` and :func:`sample_token` draws
from the result. The steps run in this order, each on what the previous one left
(a filtered-out token has logit ``-inf``; the probabilities a filter looks at are the
softmax of the remaining logits, i.e. renormalised):

1. repetition penalty ``r`` (CTRL, Keskar et al. 2019): the logit ``z`` of every token
   already in the row's text (prompt and generated tokens) becomes ``z / r`` when
   ``z > 0`` and ``z · r`` otherwise;
2. temperature ``τ``: ``z / τ`` (``τ = 0``: greedy, the argmax of step 1's logits —
   the filters below never remove the most likely token, so they do not change it);
3. top-k: keep the ``k`` largest logits, and every token tied with the ``k``-th;
4. top-p (nucleus): sort the probabilities ``p_(1) ≥ p_(2) ≥ …`` and keep the
   smallest prefix whose mass is ``≥ p`` (the most likely token always), and every
   token tied with the least likely kept one: a token is kept exactly when
   ``p_t ≥ p_(m)``, ``m`` the least index with ``p_(1) + … + p_(m) ≥ p``. Ties are
   kept together, so the result does not depend on the order of tied tokens;
5. min-p: keep the tokens with ``p_t ≥ min_p · max_s p_s``.

The masks are computed in float32; the numpy references in the tests compute the
same rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xformjax.fields import check_float, check_int

__all__ = [
    "SamplingOptions",
    "apply_repetition_penalty",
    "min_p_mask",
    "process_logits",
    "sample_token",
    "top_k_mask",
    "top_p_mask",
]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How :func:`xformjax.models.generate` picks each token (module docstring).

    Attributes:
      temperature: finite ≥ 0; ``0`` decodes greedily (the filters are then moot).
      top_k: keep the ``top_k`` most likely tokens (int ≥ 1; ``None``: all). It must
        also be ≤ the vocabulary, checked where the model is known.
      top_p: nucleus mass in ``(0, 1]``; ``1`` keeps every token.
      min_p: in ``[0, 1]``; keep tokens at least ``min_p`` times as likely as the most
        likely one (``0``: all).
      repetition_penalty: finite > 0; ``1`` is off, ``> 1`` discourages tokens already
        in the text, ``< 1`` favours them.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        owner = "SamplingOptions"
        check_float(owner, "temperature", self.temperature, at_least=0)
        check_int(owner, "top_k", self.top_k, minimum=1, optional=True)
        check_float(owner, "top_p", self.top_p, above=0, at_most=1)
        check_float(owner, "min_p", self.min_p, at_least=0, at_most=1)
        check_float(owner, "repetition_penalty", self.repetition_penalty, above=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """``ValueError`` when ``top_k`` exceeds ``vocab_size``."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ValueError(
                f"SamplingOptions: `top_k` must lie in [1, vocab_size={vocab_size}]; "
                f"got {self.top_k}"
            )


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty: ``logits`` ``[B, V]``, ``seen`` bool ``[B, V]`` (the token occurs
    in the row's text) → ``z / penalty`` (``z > 0``) or ``z · penalty`` where seen."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """bool ``[B, V]``: the ``k`` largest of ``logits`` ``[B, V]`` and their ties."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """bool ``[B, V]``: the nucleus of mass ``p`` of ``softmax(logits)`` (ties kept
    together; module docstring)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    ordered = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(ordered, axis=-1) - ordered
    count = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # ≥ 1: the first has 0 before
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    return probs >= threshold


def min_p_mask(logits: jax.Array, min_p: float) -> jax.Array:
    """bool ``[B, V]``: tokens with ``p ≥ min_p · p_max`` under ``softmax(logits)``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)


def process_logits(
    logits: jax.Array, options: SamplingOptions, seen: jax.Array | None = None
) -> jax.Array:
    """Float32 ``[B, V]``: ``logits`` after the penalty, the temperature and the filters
    (filtered-out tokens at ``-inf``). ``seen`` bool ``[B, V]``: the tokens the
    repetition penalty applies to (needed when it is not 1). Greedy options: the
    penalised logits, unscaled and unfiltered."""
    logits = logits.astype(jnp.float32)
    if options.repetition_penalty != 1:
        if seen is None:
            raise ValueError("process_logits: a repetition penalty needs `seen`")
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return logits
    logits = logits / options.temperature
    filters = []
    top_k = options.top_k
    if top_k is not None:
        filters.append(lambda z: top_k_mask(z, top_k))
    if options.top_p < 1:
        filters.append(lambda z: top_p_mask(z, options.top_p))
    if options.min_p > 0:
        filters.append(lambda z: min_p_mask(z, options.min_p))
    for keep in filters:
        logits = jnp.where(keep(logits), logits, -jnp.inf)
    return logits


def sample_token(
    logits: jax.Array,
    key: jax.Array,
    temperature: float | SamplingOptions = 1.0,
    top_k: int | None = None,
    *,
    seen: jax.Array | None = None,
) -> jax.Array:
    """int32 ``[B]``: a token drawn from ``logits`` ``[B, V]`` with ``key``.

    ``temperature`` is either a :class:`SamplingOptions` (then ``top_k`` must be
    ``None``) or the temperature, with ``top_k`` (the older two-argument form);
    ``temperature == 0`` is greedy. ``seen``: see :func:`process_logits`.
    """
    if isinstance(temperature, SamplingOptions):
        if top_k is not None:
            raise ValueError("sample_token: give `top_k` in the SamplingOptions")
        options = temperature
    else:
        options = SamplingOptions(temperature=temperature, top_k=top_k)
    processed = process_logits(logits, options, seen)
    if options.greedy:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
