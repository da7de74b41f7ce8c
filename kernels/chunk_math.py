"""The per-chunk arithmetic the kernels run, written on values (no refs).

Every function here sees one chunk of one (batch, head): ``C`` tokens, the
K×V state entering the chunk, and ``b``, the log decay accumulated from the
chunk start (``b_i = Σ_{s ≤ i} g_s`` inside the chunk, ≤ 0 and non-increasing).
Shapes: ``q, k [C, K]``, ``v [C, V]``, scalar ``b [C, 1]`` or per-channel
``b [C, K]``, ``beta [C, 1]``, state ``S [K, V]``. All arithmetic is float32;
``q`` already carries the attention scale.

Scalar gates (linear attention, and the delta rule with ``delta=True``)::

    Γ_ij = exp(b_i − b_j) [j ≤ i]                    (masked before exp, ≤ 1)
    delta rule only:
      A = tril(diag(β) (K Kᵀ ⊙ Γ), −1),  T = (I + A)⁻¹
      W = T diag(β) (K ⊙ e^b),  U = T diag(β) V − W S      (pseudo-values)
    linear attention: U = V
    O  = (Q Kᵀ ⊙ Γ) U + (Q ⊙ e^b) S
    S' = e^{b_C} S + (K ⊙ e^{b_C − b})ᵀ U

Per-channel gates (linear attention): the scores
``Σ_c q_ic k_jc exp(b_ic − b_jc)`` are built column by column (one source
row ``j`` at a time, ``[C, K]`` arrays) from masked exponents, so every
exponent stays ≤ 0.

The backward functions take the cotangents of ``O`` and of ``S'`` and return
those of every input, the entering state's, and ``db``, the cotangent of the
chunk-local cumulative log decay (the caller turns it into the gate's by a
reverse cumulative sum inside the chunk). ``db`` uses the fact that ``b``
enters only through ``e^{+b_i}`` and ``e^{−b_j}`` factors: every place a factor
appears contributes ``±(input)·(its cotangent)`` to its row, plus
``⟨dS', S'⟩``-type terms on the chunk's last row.

Only ``lax`` primitives that both Mosaic TPU and Triton lower are used: 2-D
``dot_general``, elementwise ops, ``broadcasted_iota`` masks and reductions
along one axis, all on 2-D arrays; integer index arithmetic by shifts and
masks. Rows and columns are moved with identity-matrix masks rather than
transposes or slices.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul in float32 (operands of another dtype are multiplied exactly)."""
    return lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        preferred_element_type=F32,
        precision=lax.Precision.HIGHEST,
    )


def mm(a, b):
    """``a @ b``."""
    return _dot(a, b, 1, 0)


def mm_tn(a, b):
    """``aᵀ @ b``."""
    return _dot(a, b, 0, 0)


def mm_nt(a, b):
    """``a @ bᵀ``."""
    return _dot(a, b, 1, 1)


def lower_mask(size: int, strict: bool = False):
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    return rows > cols if strict else rows >= cols


def column_to_row(col):
    """``[n, 1]`` → ``[1, n]`` through an identity mask."""
    size = col.shape[0]
    eye = _iota((size, size), 0) == _iota((size, size), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def row_to_column(row):
    """``[1, n]`` → ``[n, 1]`` through an identity mask."""
    size = row.shape[1]
    eye = _iota((size, size), 0) == _iota((size, size), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def last_row(x):
    """``[C, D]`` → its last row ``[1, D]``."""
    return row(x, x.shape[0] - 1)


def on_last_row(shape, row):
    """A ``[C, D]`` array holding ``row`` ``[1, D]`` on its last row, zeros elsewhere."""
    return jnp.where(_iota(shape, 0) == shape[0] - 1, row, 0.0)


def rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def total(x):
    """Sum of a 2-D array as ``[1, 1]`` (lanes first, then sublanes)."""
    return jnp.sum(rowsum(x), axis=0, keepdims=True)


def column(x, j: int):
    """Column ``j`` of ``x [R, C]`` as ``[R, 1]``."""
    return rowsum(jnp.where(_iota(x.shape, 1) == j, x, 0.0))


def row(x, i: int):
    """Row ``i`` of ``x [R, C]`` as ``[1, C]``."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def scalar_decay(b, strict: bool = False):
    """``Γ_ij = exp(b_i − b_j)`` on (strictly) lower entries, 0 elsewhere: ``[C, C]``."""
    mask = lower_mask(b.shape[0], strict)
    return jnp.exp(jnp.where(mask, b - column_to_row(b), -jnp.inf))


def unit_lower_inverse(a, block: int):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A`` ``[C, C]``, by matmuls only.

    Inside ``block``×``block`` diagonal blocks, forward substitution: at step
    ``s`` every block's row ``s`` becomes ``e_i − Σ_{j<i} A_ij t_j`` at once
    (one matmul; the rows it reads are final). Then, with ``T_d`` that
    block-diagonal inverse and ``N = T_d A_off`` (strictly block-lower, so
    ``N^{C/block} = 0``): ``(I + A)⁻¹ = (I − N + N² − …) T_d``.
    """
    size = a.shape[0]
    block = min(block, size)
    if block & (block - 1):
        raise ValueError(f"inverse block must be a power of two; got {block}")
    shift = jnp.int32(block.bit_length() - 1)  # int32 under jax_enable_x64 too
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(F32)
    # Integer division and remainder by shifts and masks: Mosaic has no vector divide.
    same_block = lax.shift_right_logical(rows, shift) == lax.shift_right_logical(cols, shift)
    a_diag = jnp.where(same_block, a, 0.0)
    a_off = a - a_diag
    inverse = eye
    for step in range(1, block):
        on_step = (rows & jnp.int32(block - 1)) == jnp.int32(step)
        inverse = jnp.where(on_step, eye - mm(a_diag, inverse), inverse)
    num_blocks = -(-size // block)
    if num_blocks > 1:
        nilpotent = mm(inverse, a_off)
        series = eye
        for _ in range(num_blocks - 1):
            series = eye - mm(nilpotent, series)
        inverse = mm(series, inverse)
    return inverse


def _delta_prep(k, v, b, beta, state, block):
    """The delta rule's WY/UT pieces of one chunk."""
    gamma_strict = scalar_decay(b, strict=True)
    kk = mm_nt(k, k)
    a = kk * gamma_strict * beta
    transform = unit_lower_inverse(a, block)
    x = beta * jnp.exp(b) * k
    y = beta * v
    w = mm(transform, x)
    u = mm(transform, y) - mm(w, state)
    return kk, gamma_strict, transform, w, u


def scalar_forward(q, k, v, b, beta, state, *, delta: bool, inverse_block: int = 16):
    """One chunk with a scalar gate: ``(O [C, V], S' [K, V])`` (module docstring)."""
    b_last = last_row(b)  # [1, 1]
    values = v if not delta else _delta_prep(k, v, b, beta, state, inverse_block)[-1]
    scores = mm_nt(q, k) * scalar_decay(b)
    out = mm(scores, values) + mm(q * jnp.exp(b), state)
    new_state = jnp.exp(b_last) * state + mm_tn(k * jnp.exp(b_last - b), values)
    return out, new_state


def scalar_backward(
    q, k, v, b, beta, d_out, state, d_new_state, *, delta: bool, inverse_block: int = 16
):
    """Cotangents of one scalar-gate chunk.

    Returns ``(dq, dk, dv, db, dbeta, d_state)`` (``dbeta`` is zeros without
    ``delta``).
    """
    size = q.shape[0]
    b_last = last_row(b)
    decay_last = jnp.exp(b_last)
    e_b, e_to_end = jnp.exp(b), jnp.exp(b_last - b)
    gamma = scalar_decay(b)
    if delta:
        kk, gamma_strict, transform, w, values = _delta_prep(k, v, b, beta, state, inverse_block)
    else:
        values = v
    scores = mm_nt(q, k) * gamma
    k_to_end = k * e_to_end

    d_values = mm_tn(scores, d_out) + mm(k_to_end, d_new_state)
    d_scores = mm_nt(d_out, values) * gamma
    dq = mm(d_scores, k) + mm_nt(d_out, state) * e_b
    dk_scores = mm_tn(d_scores, q)
    dk_to_end = mm_nt(values, d_new_state) * e_to_end
    d_state = mm_tn(q * e_b, d_out) + decay_last * d_new_state
    db = rowsum(q * dq) - rowsum(k * dk_scores) - rowsum(k * dk_to_end)

    if delta:
        d_state = d_state - mm_tn(w, d_values)
        # The chain rule through T, W and U collapsed (ops/delta_rule/chunk_backward.py):
        # dY = Tᵀ dU, dX = −dY Sᵀ, dA = −tril(dY Uᵀ, −1).
        dy = mm_tn(transform, d_values)
        dx = -mm_nt(dy, state)
        da = jnp.where(lower_mask(size, strict=True), -mm_nt(dy, values), 0.0)
        da_kk = da * beta * gamma_strict
        dk_rows, dk_cols = mm(da_kk, k), mm_tn(da_kk, k)
        dk_x = dx * beta * e_b
        dbeta = rowsum(da * kk * gamma_strict) + rowsum(dx * e_b * k) + rowsum(dy * v)
        dv = dy * beta
        dk = dk_scores + dk_to_end + dk_rows + dk_cols + dk_x
        db = db + rowsum(k * dk_rows) - rowsum(k * dk_cols) + rowsum(k * dk_x)
    else:
        dbeta = jnp.zeros((size, 1), F32)
        dv = d_values
        dk = dk_scores + dk_to_end

    end_terms = total(k * dk_to_end) + total(d_new_state * decay_last * state)
    db = db + on_last_row(db.shape, end_terms)
    return dq, dk, dv, db, dbeta, d_state


def _channel_decay_to(b, j: int):
    """``E_ij = exp(b_i − b_j) [j ≤ i]`` per channel for one source row ``j``: ``[C, K]``
    (masked before exp). The per-channel chunk is small (16), so the kernels walk
    ``j`` in an unrolled loop with 2-D arrays only — no ``[C, C, K]`` tensor, which
    would need lane↔sublane relayouts on TPU and many registers on GPU."""
    rows = _iota(b.shape, 0)
    return jnp.exp(jnp.where(rows >= j, b - row(b, j), -jnp.inf))


def _channel_scores(q, k, b):
    """``A_ij = Σ_c q_ic k_jc exp(b_ic − b_jc)`` for ``j ≤ i``: ``[C, C]``."""
    size = q.shape[0]
    cols = _iota((size, size), 1)
    scores = jnp.zeros((size, size), F32)
    for j in range(size):
        scores = jnp.where(cols == j, rowsum(q * row(k, j) * _channel_decay_to(b, j)), scores)
    return scores


def channel_forward(q, k, v, b, state):
    """One chunk with a per-key-channel gate ``b [C, K]``: ``(O, S')``."""
    b_last = last_row(b)  # [1, K]
    scores = _channel_scores(q, k, b)
    out = mm(scores, v) + mm(q * jnp.exp(b), state)
    new_state = row_to_column(jnp.exp(b_last)) * state + mm_tn(k * jnp.exp(b_last - b), v)
    return out, new_state


def channel_backward(q, k, v, b, d_out, state, d_new_state):
    """Cotangents ``(dq, dk, dv, db, d_state)`` of one per-channel-gate chunk."""
    size = q.shape[0]
    b_last = last_row(b)
    decay_last = row_to_column(jnp.exp(b_last))  # [K, 1]
    e_b, e_to_end = jnp.exp(b), jnp.exp(b_last - b)
    scores = _channel_scores(q, k, b)
    d_scores = jnp.where(lower_mask(size), mm_nt(d_out, v), 0.0)
    rows = _iota(q.shape, 0)
    dq = mm_nt(d_out, state) * e_b
    dk_scores = jnp.zeros(k.shape, F32)
    for j in range(size):
        weighted = column(d_scores, j) * _channel_decay_to(b, j)  # [C, K]: dA_ij E_ij
        dq = dq + weighted * row(k, j)
        dk_scores = jnp.where(rows == j, jnp.sum(weighted * q, axis=0, keepdims=True), dk_scores)
    dk_to_end = mm_nt(v, d_new_state) * e_to_end
    dv = mm_tn(scores, d_out) + mm(k * e_to_end, d_new_state)
    d_state = mm_tn(q * e_b, d_out) + decay_last * d_new_state
    end_terms = jnp.sum(k * dk_to_end, axis=0, keepdims=True) + column_to_row(
        rowsum(d_new_state * decay_last * state)
    )
    db = q * dq - k * (dk_scores + dk_to_end) + on_last_row(q.shape, end_terms)
    return dq, dk_scores + dk_to_end, dv, db, d_state
