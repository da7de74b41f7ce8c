"""Per-channel gated linear attention (GLA) by the chunk-parallel TPU kernels.

    S_t = diag(e^{gk_t}) S_{t−1} + k_t v_tᵀ        o_t = scale · S_tᵀ q_t

on padded head-major rows: ``q, k [R, L, K]``, ``v [R, L, V]`` in one dtype, ``b [R, L, K]``
the chunk-local cumulative log decay per key channel (float32, ``g`` folded in) as its
compensated pair ``(b, bl)`` (``kernels/gates.py``; every exponent of a difference is
``common.gap``, exact after a strong gate),
``h0 [R, K, V]`` float32. The state recurrence is ``state.py``'s with a per-channel
``D = diag(e^{b_last})``; the chunk-local kernels here (grid ``(R, N)``,
``("parallel", "parallel")``) need the intra-chunk scores

    A_ij = Σ_c q̃_ic k_jc e^{b_ic − b_jc}   (j ≤ i),      o = (q̃ ⊙ e^{b}) h_n + A v

with every exponent ≤ 0. The chunk (``C`` = 64) is cut into ``S``-row sub-blocks
(``S`` = 16). For rows ``I`` and earlier columns, with ``r`` the first row of ``I``,
``A_I,<r = (q̃_I ⊙ e^{b_I − b_r}) (k_{<r} ⊙ e^{b_r − b_{<r}})ᵀ`` — one matmul, both
factors ≤ 1. Inside the diagonal ``S×S`` block the kernel walks the source rows ``j``
(a ``fori_loop``) with the exact ``[S, K]`` decays ``e^{b_I − b_j}`` (masked before
the ``exp``). The backward mirrors it: ``dA = (do vᵀ) ⊙ [j ≤ i]``,
``dq̃ = dA ∘ k-terms + e^{b} ⊙ (do h_nᵀ)``, ``dk = dAᵀ ∘ q̃-terms + e^{b_last − b} ⊙ (v dh_nᵀ)``,
``dv = Aᵀ do + (k ⊙ e^{b_last − b}) dh_n``,
``db = q̃ ⊙ dq̃ − k ⊙ dk + [last row](Σ_i k ⊙ e^{b_last−b} ⊙ (v dh_nᵀ)
+ rowsum(h_n ⊙ dh_n) e^{b_last})``.

VMEM (``vmem_bytes``; ``c`` the item size, blocks double-buffered; the gate's two
parts ``2·C·K·4``)::

    output:    2·[2·C·K·c + C·V·c + K·V·c + 2·C·K·4 + C·V·c] + 4·(5·C·K + 2·C·C + 3·S·K + S·V)
    backward:  2·[2·C·K·c + 2·C·V·c + 2·K·V·c + 2·C·K·4 + 2·C·K·c + C·V·c + C·K·4]
               + 4·(11·C·K + 3·C·C + 2·C·V + 2·K·V + K·K + 7·S·K)

e.g. about 4 MiB for the backward at K = V = 256, float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import chunk_math
from ..config import ScanOptions
from . import common
from .attention import state_attention, tiles_of
from .common import F32, Tiles, mm

NAME = "gated_linear_attention"
#: Rows of the sub-blocks whose diagonal blocks are walked exactly.
SUB_BLOCK = 16


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _loop(num: int, body, init):
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(num), body, init)


def _earlier(k, b, bl, lo: int):
    """``(k_{<r} ⊙ e^{b_r − b_{<r}}`` (zero rows from ``r`` = ``lo`` on), the pair's row
    ``r``, the weights)``; ``b, bl`` the compensated pair."""
    b_r, bl_r = chunk_math.row(b, lo), chunk_math.row(bl, lo)
    weights = jnp.exp(jnp.where(_iota(b.shape, 0) < lo, common.gap(b_r, bl_r, b, bl), -jnp.inf))
    return k * weights, (b_r, bl_r), weights


def _diagonal(q_b, k_b, b_b, bl_b, lo: int, size: int, d_scores=None):
    """The exact diagonal block of rows ``I`` (``lo … lo+S−1``): ``scores [S, C]`` (zero
    outside the block's columns) and, given ``d_scores [S, C]`` (``dA_I``), also
    ``dq̃_I`` and ``dk_I`` from that block (``[S, K]``)."""
    sub = q_b.shape[0]
    rows = _iota(q_b.shape, 0)
    cols = _iota((sub, size), 1)

    def body(t, carry):
        scores, dq, dk = carry
        k_t, b_t, bl_t = chunk_math.row(k_b, t), chunk_math.row(b_b, t), chunk_math.row(bl_b, t)
        decays = jnp.exp(jnp.where(rows >= t, common.gap(b_b, bl_b, b_t, bl_t), -jnp.inf))
        scores = jnp.where(cols == lo + t, chunk_math.rowsum(q_b * k_t * decays), scores)
        if d_scores is not None:
            weighted = chunk_math.column(d_scores, lo + t) * decays
            dq = dq + weighted * k_t
            dk = jnp.where(rows == t, jnp.sum(weighted * q_b, axis=0, keepdims=True), dk)
        return scores, dq, dk

    zeros = jnp.zeros(q_b.shape, F32)
    return _loop(sub, body, (jnp.zeros((sub, size), F32), zeros, zeros))


def _output_kernel(q_ref, k_ref, v_ref, h_ref, b_ref, bl_ref, o_ref, *, scale, sub):
    dtype = q_ref.dtype
    size = q_ref.shape[0]
    q = q_ref[...].astype(F32) * scale
    k, b, bl, v, h = k_ref[...].astype(F32), b_ref[...], bl_ref[...], v_ref[...], h_ref[...]
    for lo in range(0, size, sub):
        q_b, k_b, b_b, bl_b = (
            q[lo : lo + sub],
            k[lo : lo + sub],
            b[lo : lo + sub],
            bl[lo : lo + sub],
        )
        scores, _, _ = _diagonal(q_b, k_b, b_b, bl_b, lo, size)
        if lo:
            k_earlier, (b_r, bl_r), _ = _earlier(k, b, bl, lo)
            q_later = q_b * jnp.exp(common.gap(b_b, bl_b, b_r, bl_r))
            scores = scores + mm(q_later, k_earlier, dtype, trans_b=True)
        out = mm(q_b * jnp.exp(b_b), h, dtype) + mm(scores, v, dtype)
        o_ref[lo : lo + sub, :] = out.astype(o_ref.dtype)


def _backward_kernel(
    q_ref,
    k_ref,
    v_ref,
    h_ref,
    do_ref,
    dh_ref,
    b_ref,
    bl_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    db_ref,
    *,
    scale,
    sub,
):
    dtype = q_ref.dtype
    size = q_ref.shape[0]
    q = q_ref[...].astype(F32) * scale
    k, b, bl, v, h, do, dh = (
        k_ref[...].astype(F32),
        b_ref[...],
        bl_ref[...],
        v_ref[...],
        h_ref[...],
        do_ref[...],
        dh_ref[...],
    )
    b_last = common.last_row(b)
    to_end = jnp.exp(common.gap(b_last, common.last_row(bl), b, bl))
    d_scores = jnp.where(chunk_math.lower_mask(size), mm(do, v, dtype, trans_b=True), 0.0)
    dk_to_end = mm(v, dh, dtype, trans_b=True) * to_end
    dk = dk_to_end
    dv = mm(k * to_end, dh, dtype)
    dq_blocks, dk_blocks = [], []
    for lo in range(0, size, sub):
        q_b, k_b, b_b = q[lo : lo + sub], k[lo : lo + sub], b[lo : lo + sub]
        bl_b = bl[lo : lo + sub]
        d_scores_b = d_scores[lo : lo + sub]
        scores, dq_b, dk_b = _diagonal(q_b, k_b, b_b, bl_b, lo, size, d_scores_b)
        dq_b = dq_b + mm(do[lo : lo + sub], h, dtype, trans_b=True) * jnp.exp(b_b)
        if lo:
            k_earlier, (b_r, bl_r), weights = _earlier(k, b, bl, lo)
            later = jnp.exp(common.gap(b_b, bl_b, b_r, bl_r))
            q_later = q_b * later
            scores = scores + mm(q_later, k_earlier, dtype, trans_b=True)
            dq_b = dq_b + mm(d_scores_b, k_earlier, dtype) * later
            dk = dk + mm(d_scores_b, q_later, dtype, trans_a=True) * weights
        dv = dv + mm(scores, do[lo : lo + sub], dtype, trans_a=True)
        dq_blocks.append(dq_b)
        dk_blocks.append(dk_b)
    decay_last = common.row_to_column(jnp.exp(b_last))  # [K, 1]
    end_terms = jnp.sum(k * dk_to_end, axis=0, keepdims=True) + chunk_math.column_to_row(
        chunk_math.rowsum(dh.astype(F32) * decay_last * h.astype(F32))
    )
    for index, lo in enumerate(range(0, size, sub)):
        q_b, k_b = q[lo : lo + sub], k[lo : lo + sub]
        dq_b = dq_blocks[index]
        dk_b = dk_blocks[index] + dk[lo : lo + sub]
        db_b = q_b * dq_b - k_b * dk_b
        if lo + sub == size:
            db_b = db_b + chunk_math.on_last_row(db_b.shape, end_terms)
        dq_ref[lo : lo + sub, :] = (scale * dq_b).astype(dq_ref.dtype)
        dk_ref[lo : lo + sub, :] = dk_b.astype(dk_ref.dtype)
        db_ref[lo : lo + sub, :] = db_b
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _blocks(tiles: Tiles, dtype):
    return common.chunk_blocks(tiles, dtype, gate_width=tiles.key_width)


def vmem_bytes(tiles: Tiles, dtype, *, kernel: str, sub: int = SUB_BLOCK) -> int:
    """The VMEM of the chunk-local ``"output"`` or ``"backward"`` kernel (module docstring)."""
    c, kw, vw = tiles.chunk_size, tiles.key_width, tiles.value_width
    keys, values, gates, states = _blocks(tiles, dtype)
    if kernel == "output":
        blocks = [keys, keys, values, states, gates, gates, values]
        temps = 5 * c * kw + 2 * c * c + 3 * sub * kw + sub * vw
    else:
        blocks = [keys, keys, values, states, values, states, gates, gates]
        blocks += [keys, keys, values, gates]
        temps = 11 * c * kw + 3 * c * c + 2 * c * vw + 2 * kw * vw + kw * kw + 7 * sub * kw
    return common.vmem_bytes(blocks, temporaries=4 * temps)


KERNELS = ("output", "backward")


def _grid(q, options: ScanOptions):
    return q.shape[0], q.shape[1] // options.chunk_size


def _output(q, k, v, h, b, options: ScanOptions):
    keys, values, gates, states = _blocks(tiles_of(q, v, options), q.dtype)
    sub = min(SUB_BLOCK, options.chunk_size)
    (out,) = common.call(
        lambda *refs: _output_kernel(*refs, scale=options.scale, sub=sub),
        [(q, keys), (k, keys), (v, values), (h, states), (b[0], gates), (b[1], gates)],
        [(v.shape, values)],
        grid=_grid(q, options),
        semantics=common.PARALLEL,
        interpret=options.interpret,
        name=f"{NAME}_output_fwd",
    )
    return out


def _gradients(q, k, v, h, d_out, dh, b, options: ScanOptions):
    tiles = tiles_of(q, v, options)
    keys, values, gates, states = _blocks(tiles, q.dtype)
    sub = min(SUB_BLOCK, options.chunk_size)
    dq, dk, dv, db = common.call(
        lambda *refs: _backward_kernel(*refs, scale=options.scale, sub=sub),
        [(q, keys), (k, keys), (v, values), (h, states), (d_out, values), (dh, states)]
        + [(b[0], gates), (b[1], gates)],
        [(q.shape, keys), (k.shape, keys), (v.shape, values), (b[0].shape, gates)],
        grid=_grid(q, options),
        semantics=common.PARALLEL,
        interpret=options.interpret,
        name=f"{NAME}_chunk_bwd",
    )
    return dq, dk, dv, db


#: ``(q, k, v, b, h0, options) -> (o [R, L, V]`` in ``v.dtype``, ``final [R, K, V]`` float32)``
channel_attention = state_attention(NAME, _output, _gradients)
