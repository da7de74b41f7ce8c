"""Independent float64 numpy references, token by token, written for clarity.

Each reference returns the forward outputs and, given output cotangents, the
gradient of every floating input computed by a hand-written backward pass
(back-propagation through time for the recurrences). Nothing here imports
xformjax: these are the ground truth the ops are checked against.
"""

from __future__ import annotations

import numpy as np

NORMALIZER_EPS = 1e-6


def sequences(batch: int, num_tokens: int, cu_seqlens):
    """Yield ``(row, start, end, state_index)`` for every sequence."""
    if cu_seqlens is None:
        for b in range(batch):
            yield b, 0, num_tokens, b
    else:
        cu = np.asarray(cu_seqlens)
        for n in range(len(cu) - 1):
            yield 0, int(cu[n]), int(cu[n + 1]), n


def _gates_and_state(g, gk, initial_state, batch, heads, key_dim, width, cu_seqlens):
    """Shared set-up: float64 gates, ``log_decay(b, t, h)`` (a K-vector) and the
    initial states ``[N, H, K, width]`` (zeros when not given)."""
    g = None if g is None else np.asarray(g, np.float64)
    gk = None if gk is None else np.asarray(gk, np.float64)
    num_seq = batch if cu_seqlens is None else len(cu_seqlens) - 1
    init = (
        np.zeros((num_seq, heads, key_dim, width))
        if initial_state is None
        else np.asarray(initial_state, np.float64)
    )

    def log_decay(b, t, h):
        out = np.zeros(key_dim)
        if g is not None:
            out += g[h] if g.ndim == 1 else g[b, t, h]
        if gk is not None:
            out += gk[b, t, h]
        return out

    return g, gk, init, log_decay


def _accumulate_gate_grads(grads, g, gk, b, t, h, d_log):
    """Add ``∂L/∂(log decay)`` of step (b, t, h) to the ``g`` / ``gk`` gradients."""
    if g is not None:
        if g.ndim == 1:
            grads["g"][h] += d_log.sum()
        else:
            grads["g"][b, t, h] += d_log.sum()
    if gk is not None:
        grads["gk"][b, t, h] += d_log


def linear_attention(
    q,
    k,
    v,
    *,
    g=None,
    gk=None,
    scale=None,
    normalize=False,
    initial_state=None,
    cu_seqlens=None,
    d_o=None,
    d_final=None,
):
    """``S_t = exp(g_t)·diag(exp(gk_t))·S_{t-1} + k_t v_tᵀ``, ``o_t = scale·S_tᵀq_t``.

    Returns ``(o, final, grads)``; ``grads`` (a dict keyed like the inputs) is
    filled when ``d_o`` and ``d_final`` are given.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    width = value_dim + (1 if normalize else 0)
    scale = key_dim**-0.5 if scale is None else scale
    g, gk, init, log_decay = _gates_and_state(
        g, gk, initial_state, batch, heads, key_dim, width, cu_seqlens
    )
    o = np.zeros((batch, num_tokens, heads, value_dim))
    final = np.zeros_like(init)
    grads = {
        "q": np.zeros_like(q),
        "k": np.zeros_like(k),
        "v": np.zeros_like(v),
        "g": None if g is None else np.zeros_like(g),
        "gk": None if gk is None else np.zeros_like(gk),
        "initial_state": np.zeros_like(init),
    }
    for b, start, end, n in sequences(batch, num_tokens, cu_seqlens):
        for h in range(heads):
            state = init[n, h].copy()
            history = []  # (previous state, state, numerator, decay)
            for t in range(start, end):
                decay = np.exp(log_decay(b, t, h))
                vt = np.append(v[b, t, h], 1.0) if normalize else v[b, t, h]
                previous = state
                state = decay[:, None] * previous + np.outer(k[b, t, h], vt)
                numerator = state.T @ (scale * q[b, t, h])
                o[b, t, h] = (
                    numerator[:value_dim] / (numerator[value_dim] + NORMALIZER_EPS)
                    if normalize
                    else numerator
                )
                history.append((previous, state, numerator, decay, vt))
            final[n, h] = state
            if d_o is None:
                continue
            d_state = np.asarray(d_final, np.float64)[n, h].copy()
            for t in range(end - 1, start - 1, -1):
                previous, state, numerator, decay, vt = history[t - start]
                do_t = np.asarray(d_o, np.float64)[b, t, h]
                if normalize:
                    denominator = numerator[value_dim] + NORMALIZER_EPS
                    d_num = np.append(
                        do_t / denominator, -np.dot(do_t, numerator[:value_dim]) / denominator**2
                    )
                else:
                    d_num = do_t
                d_state += np.outer(scale * q[b, t, h], d_num)
                grads["q"][b, t, h] += scale * state @ d_num
                grads["k"][b, t, h] += d_state @ vt
                grads["v"][b, t, h] += (d_state.T @ k[b, t, h])[:value_dim]
                d_log = np.sum(d_state * previous, axis=1) * decay
                _accumulate_gate_grads(grads, g, gk, b, t, h, d_log)
                d_state = decay[:, None] * d_state
            grads["initial_state"][n, h] += d_state
    return o, final, grads


def _allowed(q_pos, k_pos, q_seq, k_seq, causal, window):
    if q_seq != k_seq:
        return False
    if causal and k_pos > q_pos:
        return False
    if window is not None:
        distance = q_pos - k_pos if causal else abs(q_pos - k_pos)
        if distance >= window:
            return False
    return True


def attention(
    q,
    k,
    v,
    *,
    kind="softmax",
    causal=True,
    scale=None,
    window=None,
    cu_seqlens=None,
    bias=None,
    d_o=None,
):
    """Softmax or sigmoid attention, one query at a time.

    Queries sit at the last ``Tq`` of the ``Tk`` key positions; key/value heads
    are shared by ``Hq / Hkv`` query heads. Sigmoid attention uses
    ``σ(s·qᵀk + b)`` with ``b = −log(n)``, n the query's sequence length,
    unless ``bias`` is given (a number, or one per query, ``[Tq]``). Returns
    ``(o, grads)``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, q_heads, key_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = key_dim**-0.5 if scale is None else scale
    offset = k_len - q_len
    seq_of = np.zeros(k_len, int)
    seq_len = np.full(k_len, k_len)
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens)
        for n in range(len(cu) - 1):
            seq_of[cu[n] : cu[n + 1]] = n
            seq_len[cu[n] : cu[n + 1]] = cu[n + 1] - cu[n]
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    grads = {"q": np.zeros_like(q), "k": np.zeros_like(k), "v": np.zeros_like(v)}
    for b in range(batch):
        for i in range(q_len):
            pos = i + offset
            for h in range(q_heads):
                hk = h // group
                keys = [
                    j
                    for j in range(k_len)
                    if _allowed(pos, j, seq_of[pos], seq_of[j], causal, window)
                ]
                logits = np.array([scale * q[b, i, h] @ k[b, j, hk] for j in keys])
                if kind == "softmax":
                    weights = np.exp(logits - logits.max())
                    weights /= weights.sum()
                else:
                    shift = (
                        -np.log(seq_len[pos])
                        if bias is None
                        else np.asarray(bias, np.float64)[i]
                        if np.ndim(bias)
                        else bias
                    )
                    weights = 1.0 / (1.0 + np.exp(-(logits + shift)))
                o[b, i, h] = sum(w * v[b, j, hk] for w, j in zip(weights, keys))
                if d_o is None:
                    continue
                do_i = np.asarray(d_o, np.float64)[b, i, h]
                d_weights = np.array([do_i @ v[b, j, hk] for j in keys])
                if kind == "softmax":
                    d_logits = weights * (d_weights - np.dot(weights, d_weights))
                else:
                    d_logits = d_weights * weights * (1.0 - weights)
                for w, dl, j in zip(weights, d_logits, keys):
                    grads["v"][b, j, hk] += w * do_i
                    grads["q"][b, i, h] += scale * dl * k[b, j, hk]
                    grads["k"][b, j, hk] += scale * dl * q[b, i, h]
    return o, grads


def delta_product(
    q,
    k,
    v,
    beta,
    *,
    num_householder=1,
    g=None,
    gk=None,
    scale=None,
    initial_state=None,
    cu_seqlens=None,
    d_o=None,
    d_final=None,
):
    """Gated delta rule with ``n`` Householder sub-steps per token (n = 1: DeltaNet).

    Per token t: ``S ← diag(exp(g_t + gk_t)) S`` once, then for each sub-step j
    (rows ``t·n + j`` of k, v, β): ``S ← S + β k (v − Sᵀk)ᵀ``; then
    ``o_t = scale·Sᵀq_t``. ``cu_seqlens`` counts tokens (not rows). Returns
    ``(o, final, grads)`` like :func:`linear_attention`.
    """
    n = num_householder
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    g, gk, init, log_decay = _gates_and_state(
        g, gk, initial_state, batch, heads, key_dim, value_dim, cu_seqlens
    )
    o = np.zeros((batch, num_tokens, heads, value_dim))
    final = np.zeros_like(init)
    grads = {
        "q": np.zeros_like(q),
        "k": np.zeros_like(k),
        "v": np.zeros_like(v),
        "beta": np.zeros_like(beta),
        "g": None if g is None else np.zeros_like(g),
        "gk": None if gk is None else np.zeros_like(gk),
        "initial_state": np.zeros_like(init),
    }
    for b, start, end, index in sequences(batch, num_tokens, cu_seqlens):
        for h in range(heads):
            state = init[index, h].copy()
            tape = []  # per token: (state before decay, decay, [(S', row, u)], state after)
            for t in range(start, end):
                decay = np.exp(log_decay(b, t, h))
                before = state
                state = decay[:, None] * state
                steps = []
                for j in range(n):
                    row = t * n + j
                    kk = k[b, row, h]
                    u = beta[b, row, h] * (v[b, row, h] - state.T @ kk)
                    steps.append((state, row, u))
                    state = state + np.outer(kk, u)
                o[b, t, h] = state.T @ (scale * q[b, t, h])
                tape.append((before, decay, steps, state))
            final[index, h] = state
            if d_o is None:
                continue
            d_state = np.asarray(d_final, np.float64)[index, h].copy()
            for t in range(end - 1, start - 1, -1):
                before, decay, steps, after = tape[t - start]
                do_t = np.asarray(d_o, np.float64)[b, t, h]
                d_state += np.outer(scale * q[b, t, h], do_t)
                grads["q"][b, t, h] += scale * after @ do_t
                for previous, row, u in reversed(steps):
                    kk = k[b, row, h]
                    # S = S' + k uᵀ,  u = β (v − S'ᵀ k)
                    d_u = d_state.T @ kk
                    grads["k"][b, row, h] += d_state @ u
                    residual = v[b, row, h] - previous.T @ kk
                    grads["beta"][b, row, h] += d_u @ residual
                    grads["v"][b, row, h] += beta[b, row, h] * d_u
                    d_residual = beta[b, row, h] * d_u
                    grads["k"][b, row, h] -= previous @ d_residual
                    d_state = d_state - np.outer(kk, d_residual)
                d_log = np.sum(d_state * before, axis=1) * decay
                _accumulate_gate_grads(grads, g, gk, b, t, h, d_log)
                d_state = decay[:, None] * d_state
            grads["initial_state"][index, h] += d_state
    return o, final, grads
