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

(``b`` enters through ``e^{+b_i}`` on query rows, ``e^{−b_j}`` on key rows and
``e^{b_last}``; the caller turns ``db`` into the gate's cotangent by a reverse
cumulative sum inside each chunk — XLA's autodiff of ``layout.chunk_cumsum``.)

Shapes: ``q, k [B, L, H, K]``, ``v, do [B, L, H, V]``, ``b [B, L, H]``,
``h, dh [B, N, H, K, V]``. Kernels:

* ``output``: grid ``(V/BV, N, B·H)``, a ``fori_loop`` over ``BK`` column blocks
  accumulating ``q h`` and ``q kᵀ``;
* ``output_backward`` = ``value_backward`` (grid ``(V/BV, N, B·H)``, loop over
  ``K``) + ``query_key_backward`` (grid ``(K/BK, N, B·H)``, loop over ``V``; its
  ``db`` is a partial sum per ``K`` block, added in XLA).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .tiles import F32, causal_mask, mm


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Tiling of the chunk-local kernels (all grids are ``(feature block, N, B·H)``).

    Attributes:
      block_k: the ``K`` tile (columns of ``q``/``k``, rows of ``h``).
      block_v: the ``V`` tile (columns of ``v``/``o``/``do``).
      num_warps, num_stages: Triton launch parameters.
      backward_num_warps: ``num_warps`` of ``query_key_backward`` (three ``[C, BK]``/``[C, C]``
        float32 accumulators; 4 warps would sit at the 255-register cap).
      backward_f32_num_stages: ``num_stages`` of ``query_key_backward`` for float32 inputs
        (two stages of float32 tiles spill at K = V = 256).
    """

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2
    backward_num_warps: int = 8
    backward_f32_num_stages: int = 1


CONFIG = OutputConfig()


def _params(
    config: OutputConfig, num_warps: int | None = None, num_stages: int | None = None
) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(
        num_warps=config.num_warps if num_warps is None else num_warps,
        num_stages=config.num_stages if num_stages is None else num_stages,
    )


def _token_spec(chunk_size: int, width: int, heads: int, *, blocked: bool) -> pl.BlockSpec:
    """Chunk ``n``'s ``[C, width]`` tile of a ``[B, L, H, D]`` array: the feature block is
    grid axis 0 when ``blocked``, else the whole (``width = D``) row."""
    return pl.BlockSpec(
        (None, chunk_size, None, width),
        lambda i, n, bh: (bh // heads, n, bh % heads, i if blocked else 0),
    )


def _gate_spec(chunk_size: int, heads: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, chunk_size, None), lambda i, n, bh: (bh // heads, n, bh % heads))


def _state_spec(rows: int, cols: int, heads: int, *, blocked_axis: int) -> pl.BlockSpec:
    """Chunk ``n``'s ``[rows, cols]`` tile of a ``[B, N, H, K, V]`` array; grid axis 0
    picks the block along ``blocked_axis`` (0: ``K``, 1: ``V``)."""

    def index(i, n, bh):
        kv = (i, 0) if blocked_axis == 0 else (0, i)
        return (bh // heads, n, bh % heads, *kv)

    return pl.BlockSpec((None, None, None, rows, cols), index)


def _decay(b: jax.Array | None, chunk_size: int, *, transposed: bool = False) -> jax.Array:
    """``Γ`` (``Γᵀ`` when ``transposed``) as float32 ``[C, C]``; a 0/1 causal mask without
    a gate."""
    mask = causal_mask(chunk_size)
    if transposed:
        mask = ~causal_mask(chunk_size, strict=True)  # j ≤ i with j the row
    if b is None:
        return jnp.where(mask, 1.0, 0.0).astype(F32)
    diff = b[None, :] - b[:, None] if transposed else b[:, None] - b[None, :]
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _last(b: jax.Array) -> jax.Array:
    """The last entry of ``b [C]`` (a scalar), by a masked sum."""
    rows = jax.lax.broadcasted_iota(jnp.int32, b.shape, 0)
    return jnp.sum(jnp.where(rows == b.shape[0] - 1, b, 0.0))


def _loop(num: int, body, init):
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(num), body, init)


def _cols(i, block: int):
    return pl.ds(pl.multiple_of(i * block, block), block)


# -- forward ---------------------------------------------------------------------------------


def _output_kernel(q_ref, k_ref, v_ref, h_ref, *refs, scale: float, block_k: int):
    b_ref = refs[0] if len(refs) == 2 else None
    o_ref = refs[-1]
    chunk_size, key_width = q_ref.shape
    block_v = v_ref.shape[1]

    def body(i, carry):
        inter, scores = carry
        cols = _cols(i, block_k)
        q = q_ref[:, cols]
        inter = inter + mm(q, h_ref[cols, :])
        scores = scores + mm(q, k_ref[:, cols], trans_b=True)
        return inter, scores

    init = (jnp.zeros((chunk_size, block_v), F32), jnp.zeros((chunk_size, chunk_size), F32))
    inter, scores = _loop(key_width // block_k, body, init)
    b = b_ref[...] if b_ref is not None else None
    if b is not None:
        inter = inter * jnp.exp(b)[:, None]
    v = v_ref[...]
    scores = (scores * _decay(b, chunk_size)).astype(v.dtype)
    o_ref[...] = (scale * (inter + mm(scores, v))).astype(o_ref.dtype)


def output(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """``o [B, L, H, V]`` (dtype of ``v``) from the chunk-entering states ``h [B, N, H, K, V]``
    (same dtype as ``q, k, v``); ``b [B, L, H]`` float32 or ``None``."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    full = _token_spec(chunk_size, key_width, heads, blocked=False)
    in_specs = [full, full, _token_spec(chunk_size, bv, heads, blocked=True)]
    in_specs.append(_state_spec(key_width, bv, heads, blocked_axis=1))
    inputs = [q, k, v, h]
    if b is not None:
        in_specs.append(_gate_spec(chunk_size, heads))
        inputs.append(b.astype(F32))
    kernel = lambda *refs: _output_kernel(*refs, scale=float(scale), block_k=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        grid=(value_width // bv, num_chunks, batch * heads),
        in_specs=in_specs,
        out_specs=_token_spec(chunk_size, bv, heads, blocked=True),
        compiler_params=_params(config),
        interpret=interpret,
        name="linear_attention_output_fwd",
    )(*inputs)


# -- backward --------------------------------------------------------------------------------


def _value_kernel(q_ref, k_ref, do_ref, dh_ref, *refs, scale: float, block_k: int):
    """``dv = (q̃ kᵀ ⊙ Γ)ᵀ do + (k ⊙ e^{b_last − b}) dh`` for one ``[C, BV]`` tile."""
    b_ref = refs[0] if len(refs) == 2 else None
    dv_ref = refs[-1]
    chunk_size, key_width = q_ref.shape
    block_v = do_ref.shape[1]

    def body(i, carry):
        inter, scores_t = carry
        cols = _cols(i, block_k)
        k = k_ref[:, cols]
        inter = inter + mm(k, dh_ref[cols, :])
        scores_t = scores_t + mm(k, q_ref[:, cols], trans_b=True)  # [j, i] = k_j · q_i
        return inter, scores_t

    init = (jnp.zeros((chunk_size, block_v), F32), jnp.zeros((chunk_size, chunk_size), F32))
    inter, scores_t = _loop(key_width // block_k, body, init)
    b = b_ref[...] if b_ref is not None else None
    if b is not None:
        inter = inter * jnp.exp(_last(b) - b)[:, None]
    do = do_ref[...]
    scores_t = (scale * scores_t * _decay(b, chunk_size, transposed=True)).astype(do.dtype)
    dv_ref[...] = (inter + mm(scores_t, do)).astype(dv_ref.dtype)


def value_backward(
    q: jax.Array,
    k: jax.Array,
    do: jax.Array,
    dh: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    dtype: jnp.dtype | None = None,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """``dv [B, L, H, V]`` (``dtype``, default ``do``'s); ``dh [B, N, H, K, V]`` holds the
    cotangents of the states leaving each chunk."""
    batch, length, heads, key_width = q.shape
    value_width = do.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    full = _token_spec(chunk_size, key_width, heads, blocked=False)
    tile = _token_spec(chunk_size, bv, heads, blocked=True)
    in_specs = [full, full, tile, _state_spec(key_width, bv, heads, blocked_axis=1)]
    inputs = [q, k, do, dh]
    if b is not None:
        in_specs.append(_gate_spec(chunk_size, heads))
        inputs.append(b.astype(F32))
    kernel = lambda *refs: _value_kernel(*refs, scale=float(scale), block_k=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(do.shape, do.dtype if dtype is None else dtype),
        grid=(value_width // bv, num_chunks, batch * heads),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=_params(config),
        interpret=interpret,
        name="linear_attention_output_bwd_dv",
    )(*inputs)


def _query_key_kernel(
    q_ref, k_ref, v_ref, h_ref, do_ref, dh_ref, *refs, scale: float, block_v: int
):
    """``dq, dk`` for one ``[C, BK]`` column block, and its share of ``db``."""
    gated = len(refs) == 4
    b_ref = refs[0] if gated else None
    dq_ref, dk_ref = refs[-3:-1] if gated else refs
    db_ref = refs[-1] if gated else None
    chunk_size, block_k = q_ref.shape
    value_width = v_ref.shape[1]

    def body(i, carry):
        dq, dk, dscores, hdh = carry
        cols = _cols(i, block_v)
        do, v = do_ref[:, cols], v_ref[:, cols]
        h, dh = h_ref[:, cols], dh_ref[:, cols]
        dq = dq + mm(do, h, trans_b=True)
        dk = dk + mm(v, dh, trans_b=True)
        dscores = dscores + mm(do, v, trans_b=True)
        if gated:
            hdh = hdh + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)
        return dq, dk, dscores, hdh

    init = (
        jnp.zeros((chunk_size, block_k), F32),
        jnp.zeros((chunk_size, block_k), F32),
        jnp.zeros((chunk_size, chunk_size), F32),
        jnp.zeros((block_k,), F32),
    )
    dq_inter, dk_inter, dscores, hdh = _loop(value_width // block_v, body, init)
    q, k = q_ref[...], k_ref[...]
    b = b_ref[...] if b_ref is not None else None
    dscores = (scale * dscores * _decay(b, chunk_size)).astype(q.dtype)
    if b is not None:
        b_last = _last(b)
        dq_inter = dq_inter * jnp.exp(b)[:, None]
        dk_inter = dk_inter * jnp.exp(b_last - b)[:, None]
    dq = scale * dq_inter + mm(dscores, k)
    dk = dk_inter + mm(dscores, q, trans_a=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    if b is not None:
        assert db_ref is not None
        q32, k32 = q.astype(F32), k.astype(F32)
        db = jnp.sum(q32 * dq, axis=1) - jnp.sum(k32 * dk, axis=1)
        end = jnp.sum(jnp.sum(k32 * dk_inter, axis=1)) + jnp.exp(_last(b)) * jnp.sum(hdh)
        rows = jax.lax.broadcasted_iota(jnp.int32, (chunk_size,), 0)
        db_ref[...] = db + jnp.where(rows == chunk_size - 1, end, 0.0)


def query_key_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    do: jax.Array,
    dh: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, db)``: ``dq, dk [B, L, H, K]`` (dtypes of ``q, k``) and ``db [B, L, H]``
    float32 (``None`` without a gate)."""
    batch, length, heads, key_width = q.shape
    value_width = v.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    num_k = key_width // bk
    tile = _token_spec(chunk_size, bk, heads, blocked=True)
    full = _token_spec(chunk_size, value_width, heads, blocked=False)
    state = _state_spec(bk, value_width, heads, blocked_axis=0)
    in_specs = [tile, tile, full, state, full, state]
    inputs = [q, k, v, h, do, dh]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)]
    out_specs = [tile, tile]
    if b is not None:
        in_specs.append(_gate_spec(chunk_size, heads))
        inputs.append(b.astype(F32))
        out_shape.append(jax.ShapeDtypeStruct((num_k, batch, length, heads), F32))
        out_specs.append(
            pl.BlockSpec(
                (None, None, chunk_size, None),
                lambda i, n, bh: (i, bh // heads, n, bh % heads),
            )
        )
    kernel = lambda *refs: _query_key_kernel(*refs, scale=float(scale), block_v=bv)
    results = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_k, num_chunks, batch * heads),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_params(
            config,
            config.backward_num_warps,
            config.backward_f32_num_stages if q.dtype.itemsize >= 4 else None,
        ),
        interpret=interpret,
        name="linear_attention_output_bwd_dqk",
    )(*inputs)
    dq, dk = results[0], results[1]
    db = jnp.sum(results[2], axis=0) if b is not None else None
    return dq, dk, db


def output_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    do: jax.Array,
    dh: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: OutputConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, db)`` of the chunk-local part (module docstring); ``h`` the states
    entering each chunk, ``dh`` the cotangents of those leaving it. ``db`` is float32
    ``[B, L, H]`` (``None`` when ``b`` is)."""
    dv = value_backward(
        q,
        k,
        do,
        dh,
        b,
        scale=scale,
        chunk_size=chunk_size,
        dtype=v.dtype,
        config=config,
        interpret=interpret,
    )
    dq, dk, db = query_key_backward(
        q,
        k,
        v,
        h,
        do,
        dh,
        b,
        scale=scale,
        chunk_size=chunk_size,
        config=config,
        interpret=interpret,
    )
    return dq, dk, dv, db
