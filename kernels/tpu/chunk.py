"""The chunk-local kernels of the scalar-gated families on TPUs, parallel over chunks.

Per chunk ``n`` of one row (``C`` tokens), ``b`` the chunk-local cumulative log
decay ``[C, 1]`` (zeros without a gate) as its compensated pair ``b, lo``
(``kernels/gates.py``: every exponent of a difference is ``common.gap``, exact
after a strong gate; ``e^{b}`` takes ``b`` alone), ``Γ_ij = e^{b_i − b_j} [j ≤ i]``
(``Γ⁻`` the strict one), ``h_n`` the state entering the chunk (``state.py``),
``q̃ = scale · q``::

    wy:        A = tril(diag(β)(K Kᵀ) ⊙ Γ⁻),  T = (I + A)⁻¹              (delta rule)
               w = T diag(β)(K ⊙ e^{b}),  u = T diag(β) V
    output:    o = (q̃ ⊙ e^{b}) h_n + (q̃ kᵀ ⊙ Γ) v_n          (v_n = v, or u − w h_n)
    dv_local:  scale (q kᵀ ⊙ Γ)ᵀ do                           (delta rule's state backward)
    backward:  given h_n and dh_n (the cotangent of h_{n+1}):
               dv_n = (q̃ kᵀ ⊙ Γ)ᵀ do + (k ⊙ e^{b_last − b}) dh_n,  dS = (do v_nᵀ) ⊙ Γ
               dq̃ = dS k + e^{b} ⊙ (do h_nᵀ),  dk = dSᵀ q̃ + e^{b_last − b} ⊙ (v_n dh_nᵀ)
               db = rowsum(q̃ ⊙ dq̃) − rowsum(k ⊙ dk) + [last] (Σ k ⊙ e^{b_last−b} ⊙ v_n dh_nᵀ
                    + e^{b_last} Σ h_n ⊙ dh_n)
               delta rule (T, w, u, v_n recomputed): dY = Tᵀ dv_n, dX = −dY h_nᵀ,
               dA = −tril(dY v_nᵀ, −1); dv = β dY, dβ and the rest of dk, db from dX, dA

Grid ``(R, N)``, dimension semantics ``("parallel", "parallel")``: every chunk of
every row is independent. Matmuls of ``[C, K]``/``[C, V]``/``[K, V]`` operands take
them in the inputs' dtype (bf16 on the MXU, float32 accumulation); the triangular
inverse and ``W, U`` are float32 (``chunk_math.unit_lower_inverse``, exact to 1e-6).

VMEM (``vmem_bytes``; blocks double-buffered, ``c`` the item size, ``[C, 1]`` gates
(both parts of the pair) and ``β`` padded to 128 lanes)::

    wy:        2·[C·K·c + C·V·c + 3·C·128·4 + C·K·c + C·V·c] + 4·(6·C·C + 2·C·K + 2·C·V)
    output:    2·[2·C·K·c + C·V·c + K·V·c + 2·C·128·4 + C·V·c] + 4·(3·C·C + 2·C·V)
    dv_local:  2·[2·C·K·c + C·V·c + 2·C·128·4 + C·V·4] + 4·(3·C·C + C·V)
    backward:  2·[2·C·K·c + 2·C·V·c + 2·K·V·c + 3·C·128·4 + (2·C·K + C·V)·c + 2·C·128·4]
               + 4·(10·C·C + 8·C·K + 6·C·V + 2·K·V)

e.g. about 3.7 MiB for the backward at K = V = 256, C = 64, float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import chunk_math
from . import common
from .common import F32, Tiles, mm


def _blocks(tiles: Tiles, dtype):
    return common.chunk_blocks(tiles, dtype, gate_width=1)


def _grid(x: jax.Array, chunk_size: int) -> tuple[int, int]:
    return x.shape[0], x.shape[1] // chunk_size


# -- the delta rule's WY/UT transform ---------------------------------------------------------


def _transform(k, v, b, lo, beta, dtype, inverse_block):
    """``(K Kᵀ, Γ⁻, T, w, u)`` of one chunk (float32 values)."""
    gamma_strict = common.decay(b, lo, strict=True)
    kk = mm(k, k, dtype, trans_b=True)
    transform = chunk_math.unit_lower_inverse(kk * gamma_strict * beta, inverse_block)
    w = mm(transform, beta * jnp.exp(b) * k.astype(F32), F32)
    u = mm(transform, beta * v.astype(F32), F32)
    return kk, gamma_strict, transform, w, u


def _wy_kernel(k_ref, v_ref, b_ref, lo_ref, beta_ref, w_ref, u_ref, *, inverse_block):
    *_, w, u = _transform(
        k_ref[...], v_ref[...], b_ref[...], lo_ref[...], beta_ref[...], k_ref.dtype, inverse_block
    )
    w_ref[...] = w.astype(w_ref.dtype)
    u_ref[...] = u.astype(u_ref.dtype)


def wy(k, v, b, beta, *, tiles: Tiles, inverse_block: int, interpret: bool):
    """``(w [R, L, K], u [R, L, V])`` in ``k.dtype``; ``b`` the pair ``(hi, lo)`` and
    ``beta``, ``[R, L, 1]`` float32."""
    keys, values, column, _ = _blocks(tiles, k.dtype)
    w, u = common.call(
        lambda *refs: _wy_kernel(*refs, inverse_block=inverse_block),
        [(k, keys), (v, values), (b[0], column), (b[1], column), (beta, column)],
        [(k.shape, keys), (v.shape, values)],
        grid=_grid(k, tiles.chunk_size),
        semantics=common.PARALLEL,
        interpret=interpret,
        name="delta_rule_wy",
    )
    return w, u


# -- outputs ----------------------------------------------------------------------------------


def _output_kernel(q_ref, k_ref, v_ref, h_ref, b_ref, lo_ref, o_ref, *, scale):
    dtype = q_ref.dtype
    b = b_ref[...]
    q = q_ref[...]
    inter = mm(q, h_ref[...], dtype) * jnp.exp(b)
    scores = mm(q, k_ref[...], dtype, trans_b=True) * common.decay(b, lo_ref[...])
    o_ref[...] = (scale * (inter + mm(scores, v_ref[...], dtype))).astype(o_ref.dtype)


def output(q, k, v, h, b, *, scale: float, tiles: Tiles, interpret: bool, name: str):
    """``o [R, L, V]`` in ``v.dtype`` from the chunk-entering states ``h [R, N, K, V]``."""
    keys, values, column, states = _blocks(tiles, q.dtype)
    (out,) = common.call(
        lambda *refs: _output_kernel(*refs, scale=float(scale)),
        [(q, keys), (k, keys), (v, values), (h, states), (b[0], column), (b[1], column)],
        [(v.shape, values)],
        grid=_grid(q, tiles.chunk_size),
        semantics=common.PARALLEL,
        interpret=interpret,
        name=f"{name}_output_fwd",
    )
    return out


def _dv_local_kernel(q_ref, k_ref, do_ref, b_ref, lo_ref, dv_ref, *, scale):
    dtype = q_ref.dtype
    scores_t = mm(k_ref[...], q_ref[...], dtype, trans_b=True) * common.decay(
        b_ref[...], lo_ref[...], transposed=True
    )
    dv_ref[...] = scale * mm(scores_t, do_ref[...], dtype)


def dv_local(q, k, do, b, *, scale: float, tiles: Tiles, interpret: bool):
    """``scale (q kᵀ ⊙ Γ)ᵀ do`` ``[R, L, V]`` float32 (the delta rule's state backward)."""
    keys, values, column, _ = _blocks(tiles, q.dtype)
    out_block = common.token(tiles.chunk_size, tiles.value_width, F32, common.chunk_index)
    (dv,) = common.call(
        lambda *refs: _dv_local_kernel(*refs, scale=float(scale)),
        [(q, keys), (k, keys), (do, values), (b[0], column), (b[1], column)],
        [(do.shape, out_block)],
        grid=_grid(q, tiles.chunk_size),
        semantics=common.PARALLEL,
        interpret=interpret,
        name="delta_rule_dv_local",
    )
    return dv


# -- backward ---------------------------------------------------------------------------------


def _backward_kernel(*refs, scale, delta, inverse_block):
    refs = list(refs)
    q_ref, k_ref, v_ref, h_ref, do_ref, dh_ref, b_ref, lo_ref = refs[:8]
    refs = refs[8:]
    beta_ref = refs.pop(0) if delta else None
    dq_ref, dk_ref, dv_ref, db_ref = refs[:4]
    dbeta_ref = refs[4] if delta else None
    dtype = q_ref.dtype
    size = q_ref.shape[0]
    b, lo = b_ref[...], lo_ref[...]
    q = q_ref[...].astype(F32) * scale
    k = k_ref[...].astype(F32)
    h, dh, do = h_ref[...], dh_ref[...], do_ref[...]
    b_last = common.last_row(b)
    decay_last = jnp.exp(b_last)
    e_b, to_end = jnp.exp(b), jnp.exp(common.gap(b_last, common.last_row(lo), b, lo))
    gamma = common.decay(b, lo)
    if beta_ref is not None:
        beta = beta_ref[...]
        kk, gamma_strict, transform, w, u = _transform(
            k_ref[...], v_ref[...], b, lo, beta, dtype, inverse_block
        )
        values = u - mm(w, h, dtype)
    else:
        values = v_ref[...].astype(F32)
    scores = mm(q, k, dtype, trans_b=True) * gamma
    k_to_end = k * to_end
    d_values = mm(scores, do, dtype, trans_a=True) + mm(k_to_end, dh, dtype)
    d_scores = mm(do, values, dtype, trans_b=True) * gamma
    dq = mm(d_scores, k, dtype) + mm(do, h, dtype, trans_b=True) * e_b
    dk_scores = mm(d_scores, q, dtype, trans_a=True)
    dk_to_end = mm(values, dh, dtype, trans_b=True) * to_end
    db = chunk_math.rowsum(q * dq) - chunk_math.rowsum(k * (dk_scores + dk_to_end))
    dk = dk_scores + dk_to_end
    if beta_ref is not None and dbeta_ref is not None:
        dy = mm(transform, d_values, F32, trans_a=True)
        dx = -mm(dy, h, dtype, trans_b=True)
        da = jnp.where(
            chunk_math.lower_mask(size, strict=True), -mm(dy, values, F32, trans_b=True), 0.0
        )
        da_kk = da * beta * gamma_strict
        dk_rows = mm(da_kk, k, F32)
        dk_cols = mm(da_kk, k, F32, trans_a=True)
        dk_x = dx * beta * e_b
        dbeta = (
            chunk_math.rowsum(da * kk * gamma_strict)
            + chunk_math.rowsum(dx * e_b * k)
            + chunk_math.rowsum(dy * v_ref[...].astype(F32))
        )
        dbeta_ref[...] = dbeta
        d_values = dy * beta
        dk = dk + dk_rows + dk_cols + dk_x
        db = db + chunk_math.rowsum(k * (dk_rows - dk_cols + dk_x))
    end_terms = chunk_math.total(k * dk_to_end) + chunk_math.total(
        dh.astype(F32) * decay_last * h.astype(F32)
    )
    db_ref[...] = db + chunk_math.on_last_row(db.shape, end_terms)
    dq_ref[...] = (scale * dq).astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = d_values.astype(dv_ref.dtype)


def backward(
    q, k, v, h, do, dh, b, beta=None, *, scale, tiles: Tiles, inverse_block: int, interpret, name
):
    """``(dq, dk, dv, db, dbeta)`` (``b`` the pair ``(hi, lo)``; ``db`` the cotangent of
    ``hi``): ``dq, dk, dv`` in the dtypes of ``q, k, v``, ``db`` and
    ``dbeta`` ``[R, L, 1]`` float32 (``dbeta`` ``None`` without ``beta``). ``h`` holds the
    states entering each chunk, ``dh`` the cotangents of those leaving it."""
    keys, values, column, states = _blocks(tiles, q.dtype)
    delta = beta is not None
    inputs = [(q, keys), (k, keys), (v, values), (h, states), (do, values), (dh, states)]
    inputs += [(b[0], column), (b[1], column)]
    if delta:
        inputs.append((beta, column))
    col_shape = b[0].shape
    outputs = [(q.shape, keys), (k.shape, keys), (v.shape, values), (col_shape, column)]
    if delta:
        outputs.append((col_shape, column))
    results = common.call(
        lambda *refs: _backward_kernel(
            *refs, scale=float(scale), delta=delta, inverse_block=inverse_block
        ),
        inputs,
        outputs,
        grid=_grid(q, tiles.chunk_size),
        semantics=common.PARALLEL,
        interpret=interpret,
        name=f"{name}_chunk_bwd",
    )
    dq, dk, dv, db = results[:4]
    return dq, dk, dv, db, (results[4] if delta else None)


# -- VMEM -------------------------------------------------------------------------------------


def vmem_bytes(tiles: Tiles, dtype, *, kernel: str) -> int:
    """The VMEM of one chunk-local kernel (``"wy"``, ``"output"``, ``"dv_local"`` or
    ``"backward"``; module docstring)."""
    c, kw, vw = tiles.chunk_size, tiles.key_width, tiles.value_width
    keys, values, column, states = _blocks(tiles, dtype)
    f32_values = common.token(c, vw, F32, common.chunk_index)
    blocks, temps = {
        "wy": (
            [keys, values, column, column, column, keys, values],
            6 * c * c + 2 * c * kw + 2 * c * vw,
        ),
        "output": ([keys, keys, values, states, column, column, values], 3 * c * c + 2 * c * vw),
        "dv_local": ([keys, keys, values, column, column, f32_values], 3 * c * c + c * vw),
        "backward": (
            [keys, keys, values, states, values, states, column, column, column]
            + [keys, keys, values, column, column],
            10 * c * c + 8 * c * kw + 6 * c * vw + 2 * kw * vw,
        ),
    }[kernel]
    return common.vmem_bytes(blocks, temporaries=4 * temps)


KERNELS = ("wy", "output", "dv_local", "backward")
