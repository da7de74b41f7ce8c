"""The token-by-token form of the neural-memory update, for one head of one sequence.

Per token ``t`` (the window ``i = t−c+1 … t`` reaches back into the carried
window of earlier tokens; tokens before the sequence start have ``γ = 0``):

    u_t = Σ_i γ_i ∇_W ℓ(W_{t-1}; k_i, v_i)    (then clipped: :func:`clip_surprise`)
    momentum: m_t = η_t m_{t-1} − θ_t u_t ;  W_t = (1 − α_t) W_{t-1} + m_t
    muon:     m_t = η_t m_{t-1} − u_t     ;  W_t = (1 − α_t) W_{t-1} + θ_t NS(m_t)
    o_t = M_{W_t}(q_t)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import cast

import jax
import jax.numpy as jnp

from xformjax.ops.neural_memory import memory
from xformjax.ops.neural_memory.newton_schulz import newton_schulz

Carry = dict


def array_sum(terms: Iterable[jax.Array]) -> jax.Array:
    """Python's ``sum(terms)`` (``0 + t_0 + t_1 + …``) of a non-empty iterable, typed as
    the array it then is."""
    return cast(jax.Array, sum(terms))  # `sum` is typed `Array | Literal[0]`


@dataclasses.dataclass(frozen=True)
class Rule:
    """The static options of the update: window ``c``, optimiser, Newton–Schulz steps
    and the surprise clip ``τ`` (``None``: no clip)."""

    omega_window: int
    optimizer: str
    newton_schulz_steps: int
    max_surprise_norm: float | None = None


def clip_scale(rule: Rule, squared: jax.Array) -> jax.Array:
    """``min(1, τ / ‖u‖)`` from ``‖u‖²``: exactly 1 below ``τ`` (and without a clip)."""
    if rule.max_surprise_norm is None:
        return jnp.ones_like(squared)
    limit = jnp.asarray(rule.max_surprise_norm, squared.dtype)
    # the max keeps rsqrt away from 0 in both branches of the where
    bites = squared > limit * limit
    return jnp.where(bites, limit * jax.lax.rsqrt(jnp.maximum(squared, limit * limit)), 1)


def clip_surprise(rule: Rule, surprise: list[jax.Array]) -> list[jax.Array]:
    """``u_t · min(1, τ / ‖u_t‖)``, ``‖u_t‖² = Σ_l ‖u_{t,l}‖²`` over the memory's layers.

    ``surprise`` holds one ``[..., d_{l-1}, d_l]`` array per layer (leading axes are
    tokens). Bounding every token's step keeps the inner optimisation from running
    away when the learned step is too large for the memory's curvature (the weights
    then grow at most linearly in the number of tokens, not geometrically)."""
    if rule.max_surprise_norm is None:
        return surprise
    scale = clip_scale(rule, array_sum(jnp.sum(u * u, axis=(-2, -1)) for u in surprise))
    return [u * scale[..., None, None] for u in surprise]


def momentum_input(rule: Rule, lr: jax.Array, u: jax.Array) -> jax.Array:
    """What enters the momentum: ``−θ_t u_t`` (momentum) or ``−u_t`` (muon).

    ``lr`` broadcasts against ``u``."""
    return -lr * u if rule.optimizer == "momentum" else -u


def weight_increment(rule: Rule, lr: jax.Array, m: jax.Array) -> jax.Array:
    """What is added to the decayed weights: ``m_t`` or ``θ_t NS(m_t)``."""
    if rule.optimizer == "momentum":
        return m
    return lr * newton_schulz(m, rule.newton_schulz_steps)


def shift_window(carry: Carry, k, v, gamma, rule: Rule) -> dict:
    """The last ``c − 1`` tokens of ``window ++ new`` (empty dict when ``c == 1``)."""
    keep = rule.omega_window - 1
    if keep == 0:
        return {}
    ext_k = jnp.concatenate([carry["window_k"], k], 0)
    ext_v = jnp.concatenate([carry["window_v"], v], 0)
    ext_g = jnp.concatenate([carry["window_gamma"], gamma], 0)
    return {"window_k": ext_k[-keep:], "window_v": ext_v[-keep:], "window_gamma": ext_g[-keep:]}


def extended(carry: Carry, k, v, gamma, rule: Rule):
    """``window ++ new`` token streams (the window is empty when ``c == 1``)."""
    if rule.omega_window == 1:
        return k, v, gamma
    return (
        jnp.concatenate([carry["window_k"], k], 0),
        jnp.concatenate([carry["window_v"], v], 0),
        jnp.concatenate([carry["window_gamma"], gamma], 0),
    )


def select(flag, new: Carry, old: Carry) -> Carry:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def recurrent_sequence(
    q,
    k,
    v,
    lr,
    mom,
    decay,
    gamma,
    carry: Carry,
    rule: Rule,
    state_position,
    resets: jax.Array | None = None,
    init: Carry | None = None,
) -> tuple[jax.Array, Carry]:
    """One head: ``q, k`` ``[T, K]``, ``v`` ``[T, V]``, gates ``[T]`` → ``(o [T, V], carry)``.

    The returned carry is the one after ``state_position`` tokens (may be traced).
    ``resets`` (bool ``[T]``, with ``init``): the carry restarts from ``init`` before
    each marked token (a new sequence begins there)."""
    streams = (q, k, v, lr, mom, decay, gamma)
    if resets is not None:
        streams = streams + (resets,)

    def step(state, xs):
        current, chosen, t = state
        if resets is not None:
            assert init is not None  # resets come with the initial carry
            *xs, reset_t = xs
            current = select(reset_t, init, current)
        q_t, k_t, v_t, lr_t, mom_t, decay_t, gamma_t = xs
        ext_k, ext_v, ext_g = extended(current, k_t[None], v_t[None], gamma_t[None], rule)
        grads = memory.token_gradients(current["weights"], ext_k, ext_v, ext_g)
        surprise = clip_surprise(
            rule, [array_sum(g[j] for j in range(rule.omega_window)) for g in grads]
        )
        new_w, new_m = [], []
        for w, m, u in zip(current["weights"], current["momentum"], surprise):
            m = mom_t * m + momentum_input(rule, lr_t, u)
            new_m.append(m)
            new_w.append((1 - decay_t) * w + weight_increment(rule, lr_t, m))
        o_t = memory.forward(new_w, q_t)
        new = {
            "weights": tuple(new_w),
            "momentum": tuple(new_m),
            **shift_window(current, k_t[None], v_t[None], gamma_t[None], rule),
        }
        chosen = select(t + 1 == state_position, new, chosen)
        return (new, chosen, t + 1), o_t

    chosen = carry
    start = (carry, chosen, jnp.zeros((), jnp.int32))
    (_, chosen, _), o = jax.lax.scan(step, start, streams)
    return o, chosen
