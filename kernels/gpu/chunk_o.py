"""The chunk-local part of scalar-gated linear attention: outputs and their backward.

Per chunk ``n`` of one head, with ``h`` the state entering it, ``b`` the
chunk-local cumulative log decay (float32, ``None``: no gate),
``Γ_ij = e^{b_i − b_j} [j ≤ i]`` (masked before the ``exp``) and ``q̃ = scale·q``::

    o   = (q̃ ⊙ e^{b}) h + (q̃ kᵀ ⊙ Γ) v
    h'  = e^{b_last} h + (k ⊙ e^{b_last − b})ᵀ v          (chunk_h.py)

Backward, given ``do`` and ``dh`` (the cotangent of ``h'``, from
``chunk_h.state_backward``), with ``dS = scale · (do vᵀ) ⊙ Γ``::

    dv = (q̃ kᵀ ⊙ Γ)ᵀ do + (k ⊙ e^{b_last − b}) dh
    dq = dS k + scale · e^{b} ⊙ (do hᵀ)
    dk = dSᵀ q + e^{b_last − b} ⊙ (v dhᵀ)
    db = rowsum(q ⊙ dq) − rowsum(k ⊙ dk)
         + [i = last] (Σ k ⊙ e^{b_last − b} ⊙ (v dhᵀ) + e^{b_last} Σ h ⊙ dh)

The gated delta rule (``delta_rule.py``) runs the same two kernels with ``v`` its
pseudo-values ``v_n``: ``value_backward`` without ``dh`` gives the outputs' share
``dv_local = (q̃ kᵀ ⊙ Γ)ᵀ do`` (the state recurrence adds the rest), and
``query_key_backward`` given ``dv_n`` (the pseudo-values' cotangent) also returns
``dw = −dv_n hᵀ`` (fla's ``chunk_bwd_dqkwg``).

(``b`` enters through ``e^{+b_i}`` on query rows, ``e^{−b_j}`` on key rows and
``e^{b_last}``; the caller turns ``db`` into the gate's cotangent by a reverse
cumulative sum inside each chunk — XLA's autodiff of ``layout.chunk_cumsum``. ``b``
comes as its compensated pair ``(hi, lo)`` (``gates.py``): differences
``b_i − b_j`` are formed as ``(hi_i − hi_j) + (lo_i − lo_j)``, exact after a strong
gate; ``db`` is the cotangent of ``hi``.)

Shapes: ``q, k [B, L, H, K]``, ``v, do [B, L, H, V]``, ``b [B, L, H]`` (twice),
``h, dh [B, N, H, K, V]``. Kernels:

* ``output``: grid ``(V/BV, N, B·H)``, a ``fori_loop`` over ``BK`` column blocks
  accumulating ``q h`` and ``q kᵀ``;
* ``value_backward``: grid ``(V/BV, N, B·H)``, loop over ``K``;
* ``query_key_backward``: grid ``(K/BK, N, B·H)``, loop over ``V``; its ``db`` is a
  partial sum per ``K`` block, added in XLA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import specs
from .tiles import F32, block_slice, decay, gap, last, loop, mm


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Tiling of the chunk-local kernels (all grids are ``(feature block, N, B·H)``).

    Attributes:
      block_k: the ``K`` tile (columns of ``q``/``k``, rows of ``h``).
      block_v: the ``V`` tile (columns of ``v``/``o``/``do``).
      num_warps, num_stages: Triton launch parameters.
      backward_num_warps: ``num_warps`` of ``query_key_backward`` (three — with ``dw``
        four — ``[C, BK]``/``[C, C]`` float32 accumulators; 4 warps would sit at the
        255-register cap).
      backward_f32_num_stages: ``num_stages`` of ``query_key_backward`` for float32 inputs
        (two stages of float32 tiles spill at K = V = 256).
    """

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2
    backward_num_warps: int = 8
    backward_f32_num_stages: int = 1

    def blocks(self, key_width: int, value_width: int) -> tuple[int, int]:
        """``(BK, BV)`` for padded widths ``K, V``."""
        return min(self.block_k, key_width), min(self.block_v, value_width)


CONFIG = OutputConfig()


def _token_spec(chunk_size: int, width: int, heads: int, *, blocked: bool) -> pl.BlockSpec:
    """Chunk ``n``'s ``[C, width]`` tile of a ``[B, L, H, D]`` array: the feature block is
    grid axis 0 when ``blocked``, else the whole (``width = D``) row."""
    return specs.token_spec(chunk_size, width, heads, lambda i, n, bh: (bh, n, i if blocked else 0))


def _state_spec(rows: int, cols: int, heads: int, *, blocked_axis: int) -> pl.BlockSpec:
    """Chunk ``n``'s ``[rows, cols]`` tile of a ``[B, N, H, K, V]`` array; grid axis 0
    picks the block along ``blocked_axis`` (0: ``K``, 1: ``V``)."""

    def index(i, n, bh):
        kv = (i, 0) if blocked_axis == 0 else (0, i)
        return (bh, n, *kv)

    return specs.chunk_state_spec(None, rows, cols, heads, index)


Gate = tuple[jax.Array, jax.Array]


def _with_gate(in_specs: list, inputs: list, b: Gate | None, chunk_size: int, heads: int):
    """Append ``b``'s compensated pair ``(hi, lo)`` (float32, chunk ``n``'s ``[C]`` each) to
    the inputs when there is a gate."""
    if b is not None:
        for part in b:
            in_specs.append(specs.row_spec(chunk_size, heads, lambda i, n, bh: (bh, n)))
            inputs.append(part.astype(F32))


def _read_gate(refs: list) -> Gate | None:
    """Read the pair ``(hi, lo)`` from ``refs`` (empty: no gate, ``None``); read it where it
    is used (after the loops: a value read before them stays live through them)."""
    if not refs:
        return None
    return refs[0][...], refs[1][...]


def _to_end(b: Gate) -> jax.Array:
    """``b_last − b`` ``[C]``, exact after a strong gate (``tiles.gap``)."""
    hi, lo = b
    return gap(last(hi), last(lo), hi, lo)


# -- forward ---------------------------------------------------------------------------------


def _output_kernel(q_ref, k_ref, v_ref, h_ref, *refs, scale: float, block_k: int):
    *gate_refs, o_ref = refs
    chunk_size, key_width = q_ref.shape
    block_v = v_ref.shape[1]

    def body(i, carry):
        inter, scores = carry
        cols = block_slice(i, block_k)
        q = q_ref[:, cols]
        inter = inter + mm(q, h_ref[cols, :])
        scores = scores + mm(q, k_ref[:, cols], trans_b=True)
        return inter, scores

    init = (jnp.zeros((chunk_size, block_v), F32), jnp.zeros((chunk_size, chunk_size), F32))
    inter, scores = loop(key_width // block_k, body, init)
    b = _read_gate(gate_refs)
    if b is not None:
        inter = inter * jnp.exp(b[0])[:, None]
    v = v_ref[...]
    scores = (scores * decay(b, chunk_size)).astype(v.dtype)
    o_ref[...] = (scale * (inter + mm(scores, v))).astype(o_ref.dtype)


def output(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    b: Gate | None,
    *,
    scale: float,
    chunk_size: int,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """``o [B, L, H, V]`` (dtype of ``v``) from the chunk-entering states ``h [B, N, H, K, V]``
    (same dtype as ``q, k, v``); ``b`` the pair ``(hi, lo)`` of float32 ``[B, L, H]`` or
    ``None``."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    bk, bv = config.blocks(key_width, value_width)
    full = _token_spec(chunk_size, key_width, heads, blocked=False)
    tile = _token_spec(chunk_size, bv, heads, blocked=True)
    in_specs = [full, full, tile, _state_spec(key_width, bv, heads, blocked_axis=1)]
    inputs = [q, k, v, h]
    _with_gate(in_specs, inputs, b, chunk_size, heads)
    kernel = lambda *refs: _output_kernel(*refs, scale=float(scale), block_k=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        grid=(value_width // bv, length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=specs.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="linear_attention_output_fwd",
    )(*inputs)


# -- backward --------------------------------------------------------------------------------


def _value_kernel(q_ref, k_ref, do_ref, *refs, scale: float, block_k: int, has_dh: bool):
    """``dv = (q̃ kᵀ ⊙ Γ)ᵀ do + (k ⊙ e^{b_last − b}) dh`` for one ``[C, BV]`` tile (without
    ``dh``: the first term only)."""
    refs = list(refs)
    dv_ref = refs.pop()
    dh_ref = refs.pop(0) if has_dh else None
    gate_refs = refs[:2]
    chunk_size, key_width = q_ref.shape
    block_v = do_ref.shape[1]

    def body(i, carry):
        inter, scores_t = carry
        cols = block_slice(i, block_k)
        k = k_ref[:, cols]
        if dh_ref is not None:
            inter = inter + mm(k, dh_ref[cols, :])
        scores_t = scores_t + mm(k, q_ref[:, cols], trans_b=True)  # [j, i] = k_j · q_i
        return inter, scores_t

    inter = jnp.zeros((chunk_size, block_v), F32) if dh_ref is not None else None
    init = (inter, jnp.zeros((chunk_size, chunk_size), F32))
    inter, scores_t = loop(key_width // block_k, body, init)
    b = _read_gate(gate_refs)
    if b is not None and inter is not None:
        inter = inter * jnp.exp(_to_end(b))[:, None]
    do = do_ref[...]
    scores_t = (scale * scores_t * decay(b, chunk_size, transposed=True)).astype(do.dtype)
    dv = mm(scores_t, do)
    dv_ref[...] = (dv if inter is None else inter + dv).astype(dv_ref.dtype)


def value_backward(
    q: jax.Array,
    k: jax.Array,
    do: jax.Array,
    dh: jax.Array | None,
    b: Gate | None,
    *,
    scale: float,
    chunk_size: int,
    dtype: jnp.dtype | None = None,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
    name: str = "linear_attention_output_bwd_dv",
) -> jax.Array:
    """``dv [B, L, H, V]`` (``dtype``, default ``do``'s); ``dh [B, N, H, K, V]`` holds the
    cotangents of the states leaving each chunk (``None``: only ``(q̃ kᵀ ⊙ Γ)ᵀ do``, the
    delta rule's ``dv_local``)."""
    batch, length, heads, key_width = q.shape
    value_width = do.shape[-1]
    bk, bv = config.blocks(key_width, value_width)
    full = _token_spec(chunk_size, key_width, heads, blocked=False)
    tile = _token_spec(chunk_size, bv, heads, blocked=True)
    in_specs, inputs = [full, full, tile], [q, k, do]
    if dh is not None:
        in_specs.append(_state_spec(key_width, bv, heads, blocked_axis=1))
        inputs.append(dh)
    _with_gate(in_specs, inputs, b, chunk_size, heads)
    kernel = lambda *refs: _value_kernel(
        *refs, scale=float(scale), block_k=bk, has_dh=dh is not None
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(do.shape, do.dtype if dtype is None else dtype),
        grid=(value_width // bv, length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=specs.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


def _query_key_kernel(
    q_ref,
    k_ref,
    v_ref,
    h_ref,
    do_ref,
    *refs,
    scale: float,
    block_v: int,
    delta: bool,
    gated: bool,
):
    """``dq, dk`` for one ``[C, BK]`` column block, and its share of ``db`` (``gated``); with
    ``delta`` (a ``dv`` input before ``dh``, a ``dw`` output after ``dk``) also
    ``dw = −dv hᵀ``."""
    refs = list(refs)
    dv_ref = refs.pop(0) if delta else None
    dh_ref = refs.pop(0)
    gate_refs = [refs.pop(0), refs.pop(0)] if gated else []
    dq_ref, dk_ref = refs.pop(0), refs.pop(0)
    dw_ref = refs.pop(0) if delta else None
    db_ref = refs.pop(0) if gated else None
    chunk_size, block_k = q_ref.shape
    value_width = v_ref.shape[1]

    def body(i, carry):
        dq, dk, dw, dscores, hdh = carry
        cols = block_slice(i, block_v)
        do, v = do_ref[:, cols], v_ref[:, cols]
        dv = dv_ref[:, cols] if dv_ref is not None else None
        h, dh = h_ref[:, cols], dh_ref[:, cols]
        dq = dq + mm(do, h, trans_b=True)
        dk = dk + mm(v, dh, trans_b=True)
        if dv is not None:
            dw = dw - mm(dv, h, trans_b=True)
        dscores = dscores + mm(do, v, trans_b=True)
        if gated:
            hdh = hdh + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)
        return dq, dk, dw, dscores, hdh

    tile = jnp.zeros((chunk_size, block_k), F32)
    init = (
        tile,
        tile,
        tile if delta else None,
        jnp.zeros((chunk_size, chunk_size), F32),
        jnp.zeros((block_k,), F32),
    )
    dq_inter, dk_inter, dw, dscores, hdh = loop(value_width // block_v, body, init)
    if dw_ref is not None:
        dw_ref[...] = dw.astype(dw_ref.dtype)
    q, k = q_ref[...], k_ref[...]
    b = _read_gate(gate_refs)
    dscores = (scale * dscores * decay(b, chunk_size)).astype(q.dtype)
    if b is not None:
        dq_inter = dq_inter * jnp.exp(b[0])[:, None]
        dk_inter = dk_inter * jnp.exp(_to_end(b))[:, None]
    dq = scale * dq_inter + mm(dscores, k)
    dk = dk_inter + mm(dscores, q, trans_a=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    if b is not None:
        assert db_ref is not None
        q32, k32 = q.astype(F32), k.astype(F32)
        db = jnp.sum(q32 * dq, axis=1) - jnp.sum(k32 * dk, axis=1)
        end = jnp.sum(jnp.sum(k32 * dk_inter, axis=1)) + jnp.exp(last(b[0])) * jnp.sum(hdh)
        rows = jax.lax.broadcasted_iota(jnp.int32, (chunk_size,), 0)
        db_ref[...] = db + jnp.where(rows == chunk_size - 1, end, 0.0)


def query_key_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    do: jax.Array,
    dh: jax.Array,
    b: Gate | None,
    *,
    dv: jax.Array | None = None,
    scale: float,
    chunk_size: int,
    dk_dtype: jnp.dtype | None = None,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
    name: str = "linear_attention_output_bwd_dqk",
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """``(dq, dk, dw, db)``: ``dq, dk [B, L, H, K]`` (dtypes of ``q`` and ``dk_dtype``,
    default ``k``'s), ``dw = −dv hᵀ`` in ``q``'s dtype (``None`` without ``dv``) and
    ``db [B, L, H]`` float32 (``None`` without a gate). ``h`` holds the states entering
    each chunk, ``dh`` the cotangents of those leaving it; the delta rule passes its
    pseudo-values as ``v`` and their cotangent as ``dv``."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = config.blocks(key_width, value_width)
    num_k = key_width // bk
    tile = _token_spec(chunk_size, bk, heads, blocked=True)
    full = _token_spec(chunk_size, value_width, heads, blocked=False)
    state = _state_spec(bk, value_width, heads, blocked_axis=0)
    in_specs = [tile, tile, full, state, full]
    inputs = [q, k, v, h, do]
    if dv is not None:
        in_specs.append(full)
        inputs.append(dv)
    in_specs.append(state)
    inputs.append(dh)
    _with_gate(in_specs, inputs, b, chunk_size, heads)
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype if dk_dtype is None else dk_dtype),
    ]
    if dv is not None:
        out_shape.append(jax.ShapeDtypeStruct(k.shape, q.dtype))
    out_specs = [tile] * len(out_shape)
    if b is not None:
        out_shape.append(jax.ShapeDtypeStruct((num_k, batch, length, heads), F32))
        out_specs.append(
            pl.BlockSpec(
                (None, None, chunk_size, None),
                lambda i, n, bh: (i, bh // heads, n, bh % heads),
            )
        )
    kernel = lambda *refs: _query_key_kernel(
        *refs, scale=float(scale), block_v=bv, delta=dv is not None, gated=b is not None
    )
    stages = config.backward_f32_num_stages if q.dtype.itemsize >= 4 else config.num_stages
    results = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_k, num_chunks, batch * heads),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=specs.compiler_params(config.backward_num_warps, stages),
        interpret=interpret,
        name=name,
    )(*inputs)
    dq, dk = results[0], results[1]
    dw = results[2] if dv is not None else None
    db = jnp.sum(results[-1], axis=0) if b is not None else None
    return dq, dk, dw, db
