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
``[C, C]`` transfer-matrix product each (:func:`transfer`). With Muon the ``C``
per-token weights of a chunk are materialised (``NS`` needs each ``m_t``:
:func:`materialised_chunk_step`); with momentum nothing weight-sized is formed
per token: every gradient is rank 1 per layer, so ``M_{W_t}(q_t)`` is computed
from ``[C, C + c − 1]`` coefficient matrices (the dual form,
:func:`dual_chunk_step`), and the weights only at the chunk end. Chunks are
scanned with ``lax.scan`` under ``jax.checkpoint`` (the backward pass
recomputes a chunk from its carry), so time and memory are linear in ``T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops.neural_memory import memory
from xformjax.ops.neural_memory.recurrent import (
    Carry,
    Rule,
    array_sum,
    clip_scale,
    clip_surprise,
    extended,
    momentum_input,
    select,
    shift_window,
    weight_increment,
)

HIGHEST = jax.lax.Precision.HIGHEST


def transfer(a: jax.Array, restart: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The transfer matrix of ``x_t = a_t x_{t-1} + b_t`` over ``a`` ``[C]``.

    Returns ``(L [C, C], P [C])`` with ``x_t = P_t x0 + Σ_{s ≤ t} L_ts b_s``:
    ``L_ts = Π_{r=s+1}^{t} a_r`` (zero above the diagonal), ``P_t = Π_{r ≤ t} a_r``.
    ``L`` is a cumulative product down the columns of a matrix holding ``a_r`` below
    the diagonal and 1 elsewhere: no division and no logarithm, so ``a = 0`` (a full
    reset) is exact.

    ``restart`` (bool ``[C]``): at a marked token the recurrence starts again from
    ``x0``, ``x_t = a_t x0 + b_t``: ``L_ts = 0`` across a restart and ``P_t`` is the
    product from the token's last restart on (sequences packed in one chunk)."""
    size = a.shape[0]
    rows = jnp.arange(size)
    kept = a if restart is None else jnp.where(restart, 0, a)
    factors = jnp.where(rows[:, None] > rows[None, :], kept[:, None], 1)
    lower = jnp.where(rows[:, None] >= rows[None, :], jnp.cumprod(factors, axis=0), 0)
    if restart is None:
        return lower, jnp.cumprod(a)
    # P_t = Π_{r=s}^{t} a_r from the token's last restart s (or 0), multiplied in the
    # order cumprod(a) multiplies a sequence that starts at s (same rounding as alone)
    from_row = jnp.cumprod(jnp.where(rows[:, None] >= rows[None, :], a[:, None], 1), axis=0)
    last = jax.lax.cummax(jnp.where(restart, rows, 0), axis=0)
    return lower, jnp.sum(jnp.where(rows[None, :] == last[:, None], from_row, 0), axis=1)


def linear_scan(
    a: jax.Array, b: jax.Array, x0: jax.Array, restart: jax.Array | None = None
) -> jax.Array:
    """All ``x_t = a_t x_{t-1} + b_t`` (``a`` ``[C]``, ``b`` ``[C, ...]``) from ``x0``
    (restarting from ``x0`` where ``restart``: :func:`transfer`), as one matmul with the
    :func:`transfer` matrix — cheaper to run and to differentiate than an associative
    scan over the ``C`` weight-sized ``b_t``."""
    size = a.shape[0]
    lower, prod = transfer(a, restart)
    acc = jnp.matmul(lower, b.reshape(size, -1), precision=HIGHEST)
    return prod.reshape((size,) + (1,) * (b.ndim - 1)) * x0[None] + acc.reshape(b.shape)


def segments(reset: jax.Array | None, size: int, rule: Rule):
    """``(restart [C] or None, same [C, C + c − 1] or None)``: where the recurrences
    restart, and which window rows (the ``c − 1`` carried ones, then the chunk's) belong
    to the same sequence as each token (a restart cuts the Omega window)."""
    if reset is None:
        return None, None
    keep = rule.omega_window - 1
    index = jnp.cumsum(reset.astype(jnp.int32))
    ext_index = jnp.concatenate([jnp.zeros((keep,), jnp.int32), index])
    return reset, ext_index[None, :] == index[:, None]


def materialised_chunk_step(
    carry: Carry, xs, rule: Rule, reset: jax.Array | None = None
) -> tuple[Carry, jax.Array]:
    """One chunk with its ``C`` per-token weights formed (any optimiser; Muon needs
    them for ``NS(m_t)``). ``xs`` = ``(q, k, v, lr, mom, decay, gamma)``, ``C`` rows;
    ``reset`` (bool ``[C]``): tokens where the recurrences restart from the chunk-start
    state (see :func:`chunk_sequence`)."""
    q, k, v, lr, mom, decay, gamma = xs
    size, c = q.shape[0], rule.omega_window
    restart, same = segments(reset, size, rule)
    ext_k, ext_v, ext_g = extended(carry, k, v, gamma, rule)
    grads = memory.token_gradients(carry["weights"], ext_k, ext_v, ext_g)

    def in_window(j: int, g: jax.Array) -> jax.Array:
        rows = g[j : j + size]  # [C, d, d']: row t is ext row t + j of token t's window
        if same is None:
            return rows
        return rows * same[jnp.arange(size), jnp.arange(size) + j][:, None, None]

    surprise = clip_surprise(rule, [array_sum(in_window(j, g) for j in range(c)) for g in grads])
    per_token_w, new_w, new_m = [], [], []
    for w0, m0, u in zip(carry["weights"], carry["momentum"], surprise):
        lr_b = lr[:, None, None]
        m_all = linear_scan(mom, momentum_input(rule, lr_b, u), m0, restart)
        w_all = linear_scan(1 - decay, weight_increment(rule, lr_b, m_all), w0, restart)
        per_token_w.append(w_all)
        new_w.append(w_all[-1])
        new_m.append(m_all[-1])
    o = memory.forward_per_token(per_token_w, q)
    new = {
        "weights": tuple(new_w),
        "momentum": tuple(new_m),
        **next_window(carry, k, v, gamma, rule, same),
    }
    return new, o


def next_window(carry: Carry, k, v, gamma, rule: Rule, same: jax.Array | None) -> dict:
    """:func:`shift_window`, with ``γ`` zeroed before the chunk's last restart (the
    window carries on only the last sequence's tokens)."""
    if same is None or rule.omega_window == 1:
        return shift_window(carry, k, v, gamma, rule)
    keep = rule.omega_window - 1
    carry = dict(carry, window_gamma=jnp.where(same[-1, :keep], carry["window_gamma"], 0))
    return shift_window(carry, k, v, jnp.where(same[-1, keep:], gamma, 0), rule)


def dual_chunk_step(
    carry: Carry, xs, rule: Rule, reset: jax.Array | None = None
) -> tuple[Carry, jax.Array]:
    """One chunk of the momentum optimiser without forming per-token weights.

    Every gradient is rank 1, ``a_e ⊗ δ_e`` per layer (:func:`memory.gradient_factors`,
    ``e`` over the window's ``E = C + c − 1`` tokens), so with the banded window
    ``Ω_te = [t ≤ e ≤ t + c − 1]``, the clip scales ``s_t`` and the transfer matrices
    ``(L^m, P^m)`` of the momentum and ``(L^w, P^w)`` of the weights:

        m_t = P^m_t m_0 + Σ_e A_te a_e ⊗ δ_e,       A = L^m diag(−θ s) Ω    [C, E]
        W_t = P^w_t W_0 + (L^w P^m)_t m_0 + Σ_e D_te a_e ⊗ δ_e,     D = L^w A
        h W_t = P^w_t (h W_0) + (L^w P^m)_t (h m_0) + Σ_e D_te (h · a_e) δ_e

    — ``[C, E]`` matmuls per layer; the weights are formed once, at the chunk end.
    ``‖u_t‖² = Σ_l (Ω (G^a_l ∘ G^δ_l) Ωᵀ)_tt`` from the Gram matrices of the factors.
    Same arithmetic as :func:`materialised_chunk_step`, in another order (``reset``
    as there: restarts cut ``Ω`` and the transfer matrices)."""
    q, k, v, lr, mom, decay, gamma = xs
    size, c = q.shape[0], rule.omega_window
    restart, same = segments(reset, size, rule)
    ext_k, ext_v, ext_g = extended(carry, k, v, gamma, rule)
    inputs, deltas = memory.gradient_factors(carry["weights"], ext_k, ext_v, ext_g)
    rows = jnp.arange(size)[:, None]
    cols = jnp.arange(size + c - 1)[None, :]
    band = (cols >= rows) & (cols < rows + c)
    window = (band if same is None else band & same).astype(q.dtype)  # Ω [C, E]
    if rule.max_surprise_norm is None:
        scale = jnp.ones_like(lr)
    else:
        gram = sum((a @ a.T) * (d @ d.T) for a, d in zip(inputs, deltas))
        squared = jnp.sum(jnp.matmul(window, gram, precision=HIGHEST) * window, axis=1)
        scale = clip_scale(rule, squared)
    momentum_lower, momentum_prod = transfer(mom, restart)
    weight_lower, weight_prod = transfer(1 - decay, restart)
    momentum_coeffs = jnp.matmul(
        momentum_lower * (-lr * scale)[None, :], window, precision=HIGHEST
    )  # A [C, E]
    weight_coeffs = jnp.matmul(weight_lower, momentum_coeffs, precision=HIGHEST)  # D
    from_momentum = jnp.matmul(weight_lower, momentum_prod, precision=HIGHEST)  # L^w P^m
    h = q
    new_w, new_m = [], []
    layers = zip(carry["weights"], carry["momentum"], inputs, deltas)
    for index, (w0, m0, a, d) in enumerate(layers):
        z = (
            weight_prod[:, None] * (h @ w0)
            + from_momentum[:, None] * (h @ m0)
            + ((h @ a.T) * weight_coeffs) @ d
        )
        h = jax.nn.silu(z) if index < len(inputs) - 1 else z
        new_w.append(
            weight_prod[-1] * w0 + from_momentum[-1] * m0 + a.T @ (weight_coeffs[-1][:, None] * d)
        )
        new_m.append(momentum_prod[-1] * m0 + a.T @ (momentum_coeffs[-1][:, None] * d))
    new = {
        "weights": tuple(new_w),
        "momentum": tuple(new_m),
        **next_window(carry, k, v, gamma, rule, same),
    }
    return new, h


def chunk_step(
    carry: Carry, xs, rule: Rule, reset: jax.Array | None = None
) -> tuple[Carry, jax.Array]:
    """One chunk: ``xs`` = ``(q, k, v, lr, mom, decay, gamma)`` with ``C`` rows each."""
    if rule.optimizer == "momentum":
        return dual_chunk_step(carry, xs, rule, reset)
    return materialised_chunk_step(carry, xs, rule, reset)


def chunk_sequence(
    q,
    k,
    v,
    lr,
    mom,
    decay,
    gamma,
    carry: Carry,
    rule: Rule,
    chunk_size: int,
    state_position,
    resets: jax.Array | None = None,
    init: Carry | None = None,
) -> tuple[jax.Array, Carry]:
    """One head: ``q, k`` ``[T, K]``, ``v`` ``[T, V]``, gates ``[T]`` → ``(o, carry)``.

    The returned carry is the one after ``state_position`` tokens, which must be
    ``T`` or a multiple of ``chunk_size`` (may be traced).

    ``resets`` (bool ``[T]``, with ``init``, the initial carry): a chunk whose first
    token is marked starts from ``init``; a mark inside a chunk restarts the momentum
    and weight recurrences from the chunk-start state and cuts the Omega window there,
    with every gradient of the chunk still taken at the chunk-start weights. That is
    the fresh start of a new sequence exactly when the chunk's first token is marked
    too (the arrangement :mod:`.layout` makes)."""
    length = q.shape[0]
    full = length // chunk_size
    streams = (q, k, v, lr, mom, decay, gamma)
    if resets is None:
        step = jax.checkpoint(lambda c_, x_: chunk_step(c_, x_, rule))
    else:
        assert init is not None  # resets come with the initial carry

        def restarting(c_, x_):
            *x_, reset = x_
            c_ = select(reset[0], init, c_)
            return chunk_step(c_, tuple(x_), rule, reset)

        step = jax.checkpoint(restarting)
        streams = streams + (resets,)
    outputs = []
    chosen = carry
    if full:
        body = tuple(
            x[: full * chunk_size].reshape((full, chunk_size) + x.shape[1:]) for x in streams
        )

        def scan_step(state, xs):
            current, chosen_, end = state
            new, o = step(current, xs)
            end = end + chunk_size
            return (new, select(end == state_position, new, chosen_), end), o

        (carry, chosen, _), o = jax.lax.scan(
            scan_step, (carry, chosen, jnp.zeros((), jnp.int32)), body
        )
        outputs.append(o.reshape((full * chunk_size,) + o.shape[2:]))
    if length > full * chunk_size:
        tail = tuple(x[full * chunk_size :] for x in streams)
        carry, o = step(carry, tail)
        chosen = select(length == state_position, carry, chosen)
        outputs.append(o)
    return jnp.concatenate(outputs, 0) if len(outputs) > 1 else outputs[0], chosen
