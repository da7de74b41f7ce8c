"""The chunked (parallel-training) form of the neural-memory update, one head.

The sequence is cut into chunks of ``C`` tokens (the last one may be shorter).
Within a chunk every gradient is taken at the chunk-start weights ``W_0``
(Titans' parallel training form — an approximation of the token-by-token rule
for ``C > 1``, exact for ``C = 1``):

    u_t = Σ_{i=t−c+1}^{t} γ_i ∇_W ℓ(W_0; k_i, v_i)           (batched matmuls; clipped)
    m_t = η_t m_{t-1} + (−θ_t u_t  or  −u_t)                   (a linear scan)
    W_t = (1 − α_t) W_{t-1} + (m_t  or  θ_t NS(m_t))           (a linear scan)
    o_t = M_{W_t}(q_t)

The two recurrences are linear, ``x_t = a_t x_{t-1} + b_t``, and run as one
``[C, C]`` transfer-matrix product each (:func:`linear_scan`); the ``C``
per-token weights of a chunk are materialised, nothing longer. Chunks are scanned with ``lax.scan`` under
``jax.checkpoint`` (the backward pass recomputes a chunk from its carry), so
time and memory are linear in ``T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.neural_memory import memory
from xformjax.ops.neural_memory.recurrent import (Carry, Rule, clip_surprise, extended,
                                                  momentum_input, select, shift_window,
                                                  weight_increment)


def linear_scan(a: jax.Array, b: jax.Array, x0: jax.Array) -> jax.Array:
    """All ``x_t = a_t x_{t-1} + b_t`` (``a`` ``[C]``, ``b`` ``[C, ...]``) from ``x0``.

    As one matmul: ``x_t = P_t x0 + Σ_{s ≤ t} L_ts b_s`` with the transfer matrix
    ``L_ts = Π_{r=s+1}^{t} a_r`` (``[C, C]``, zero above the diagonal) and
    ``P_t = Π_{r ≤ t} a_r``. ``L`` is a cumulative product down the columns of a
    matrix holding ``a_r`` below the diagonal and 1 elsewhere: no division and no
    logarithm, so ``a = 0`` (a full reset) is exact, and it costs ``O(C²)`` besides
    the matmul — cheaper to run and to differentiate than an associative scan over
    the ``C`` weight-sized ``b_t``."""
    size = a.shape[0]
    rows = jnp.arange(size)
    factors = jnp.where(rows[:, None] > rows[None, :], a[:, None], 1)
    transfer = jnp.where(rows[:, None] >= rows[None, :], jnp.cumprod(factors, axis=0), 0)
    acc = jnp.matmul(transfer, b.reshape(size, -1), precision=jax.lax.Precision.HIGHEST)
    prod = jnp.cumprod(a).reshape((size,) + (1,) * (b.ndim - 1))
    return prod * x0[None] + acc.reshape(b.shape)


def chunk_step(carry: Carry, xs, rule: Rule) -> tuple[Carry, jax.Array]:
    """One chunk: ``xs`` = ``(q, k, v, lr, mom, decay, gamma)`` with ``C`` rows each."""
    q, k, v, lr, mom, decay, gamma = xs
    size, c = q.shape[0], rule.omega_window
    ext_k, ext_v, ext_g = extended(carry, k, v, gamma, rule)
    grads = memory.token_gradients(carry["weights"], ext_k, ext_v, ext_g)
    surprise = clip_surprise(rule, [sum(g[j:j + size] for j in range(c))  # [C, d, d']
                                    for g in grads])
    per_token_w, new_w, new_m = [], [], []
    for w0, m0, u in zip(carry["weights"], carry["momentum"], surprise):
        lr_b = lr[:, None, None]
        m_all = linear_scan(mom, momentum_input(rule, lr_b, u), m0)
        w_all = linear_scan(1 - decay, weight_increment(rule, lr_b, m_all), w0)
        per_token_w.append(w_all)
        new_w.append(w_all[-1])
        new_m.append(m_all[-1])
    o = memory.forward_per_token(per_token_w, q)
    new = {"weights": tuple(new_w), "momentum": tuple(new_m),
           **shift_window(carry, k, v, gamma, rule)}
    return new, o


def chunk_sequence(q, k, v, lr, mom, decay, gamma, carry: Carry, rule: Rule,
                   chunk_size: int, state_position) -> tuple[jax.Array, Carry]:
    """One head: ``q, k`` ``[T, K]``, ``v`` ``[T, V]``, gates ``[T]`` → ``(o, carry)``.

    The returned carry is the one after ``state_position`` tokens, which must be
    ``T`` or a multiple of ``chunk_size`` (may be traced)."""
    length = q.shape[0]
    full = length // chunk_size
    streams = (q, k, v, lr, mom, decay, gamma)
    step = jax.checkpoint(lambda c_, x_: chunk_step(c_, x_, rule))
    outputs = []
    chosen = carry
    if full:
        body = tuple(x[:full * chunk_size].reshape((full, chunk_size) + x.shape[1:])
                     for x in streams)

        def scan_step(state, xs):
            current, chosen_, end = state
            new, o = step(current, xs)
            end = end + chunk_size
            return (new, select(end == state_position, new, chosen_), end), o

        (carry, chosen, _), o = jax.lax.scan(
            scan_step, (carry, chosen, jnp.zeros((), jnp.int32)), body)
        outputs.append(o.reshape((full * chunk_size,) + o.shape[2:]))
    if length > full * chunk_size:
        tail = tuple(x[full * chunk_size:] for x in streams)
        carry, o = step(carry, tail)
        chosen = select(length == state_position, carry, chosen)
        outputs.append(o)
    return jnp.concatenate(outputs, 0) if len(outputs) > 1 else outputs[0], chosen
