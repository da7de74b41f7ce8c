"""The gated delta rule by the chunk-parallel GPU kernels, forward and backward.

    S' = e^{g_t} S_{t−1}
    S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ          o_t = scale · S_tᵀ q_t        (S: [K, V])

with no gate, ``g [H]`` or ``g [B, T, H]`` and ``β ∈ (0, 2)``. Inputs are padded
(``layout.py``; a padded token has ``k = v = 0``, ``g = 0``, ``β = 0``) and the gate
becomes the chunk-local cumulative log decay ``b`` in XLA. Per chunk (fla's
gated delta rule, WY/UT form)::

    w, u      = T diag(β)(K ⊙ e^{b}),  T diag(β) V,  T = (I + A)⁻¹       (wy.forward)
    v_n       = u − w h_n,  h_{n+1} = e^{b_last} h_n + (K ⊙ e^{b_last − b})ᵀ v_n   (delta_h.py)
    o         = scale [(Q ⊙ e^{b}) h_n + (Q Kᵀ ⊙ Γ) v_n]                   (chunk_o.output)

Backward (``jax.custom_vjp``; residuals: the padded inputs and ``T``)::

    recompute w, u (wy.recompute), h, v_n (delta_h.forward)
    dv_local = scale (Q Kᵀ ⊙ Γ)ᵀ dO                                     (here)
    dh, dv_n  by the reverse state recurrence                             (delta_h.backward)
    dq, dk, dw = −dv_n h_nᵀ, db                                          (here)
    dk, dv, dβ, db through w, u, T                                        (wy.backward)

XLA's autodiff of the padding, the broadcast of ``g [H]`` and the chunk cumsum turns
``db`` into ``dg`` (a reverse cumulative sum inside each chunk, summed over ``B, T``
for ``g [H]``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import chunk_o, delta_h, layout, wy
from .tiles import F32, causal_mask, mm


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of one call (``custom_vjp``'s non-differentiable argument).

    Attributes:
      scale: the query scale.
      chunk_size: tokens per chunk (a multiple of 16).
      interpret: run every ``pallas_call`` in Pallas' interpreter.
    """

    scale: float
    chunk_size: int = 64
    interpret: bool = False


@dataclasses.dataclass(frozen=True)
class GradConfig:
    """Tiling of the delta-specific output-backward kernels (grids ``(block, N, B·H)``).

    Attributes:
      block_k: the ``K`` tile (grid axis of ``dq/dk/dw``; loop of ``dv_local``).
      block_v: the ``V`` tile (grid axis of ``dv_local``; loop of ``dq/dk/dw``).
      num_warps: Triton's ``num_warps`` of ``dv_local``.
      query_key_num_warps: of ``dq, dk, dw`` (four ``[C, BK]``/``[C, C]`` float32
        accumulators: 8 warps keep them from spilling).
      num_stages: Triton's pipelining stages (one for float32 inputs in ``dq, dk, dw``,
        whose double-buffered float32 tiles would spill).
    """

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    query_key_num_warps: int = 8
    num_stages: int = 2


CONFIG = GradConfig()


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    initial_state: jax.Array | None,
    *,
    scale: float,
    interpret: bool,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The chunked gated delta rule.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16).
      beta: ``[B, T, H]``, in ``(0, 2)``.
      g: log decay ``[H]`` or ``[B, T, H]``, or ``None`` (no gate).
      initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
      scale: the query scale.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      chunk_size: tokens per chunk (a multiple of 16).

    Returns:
      ``(o [B, T, H, V]`` in ``result_type(q, k, v)``, ``final_state [B, H, K, V]``
      float32). Differentiable in ``q, k, v, beta, g`` and ``initial_state``.
    """
    batch, num_tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = jnp.result_type(q, k, v)
    length = layout.padded_length(num_tokens, chunk_size)
    key_width, value_width = layout.feature_width(key_dim), layout.feature_width(value_dim)
    q_p = layout.pad(q.astype(dtype), length, key_width)
    k_p = layout.pad(k.astype(dtype), length, key_width)
    v_p = layout.pad(v.astype(dtype), length, value_width)
    beta_p = layout.pad(beta.astype(F32), length)
    gate = layout.scalar_gate(g, (batch, num_tokens, heads))
    b = None if gate is None else layout.chunk_cumsum(layout.pad(gate, length), chunk_size)
    h0 = layout.pad_state(initial_state, (batch, heads, key_width, value_width))
    options = Options(float(scale), chunk_size, bool(interpret))
    # jax.custom_vjp.__new__ may return a custom_vjp3, so pyright loses the return type
    out, final = _delta(q_p, k_p, v_p, beta_p, b, h0, options)  # pyright: ignore[reportGeneralTypeIssues]
    return (
        layout.unpad_tokens(out, num_tokens, value_dim),
        layout.unpad_state(final, key_dim, value_dim),
    )


def _forward(q, k, v, beta, b, h0, options: Options):
    size, interpret = options.chunk_size, options.interpret
    w, u, t = wy.forward(k, v, beta, b, chunk_size=size, interpret=interpret)
    h, v_new, final = delta_h.forward(k, w, u, b, h0, chunk_size=size, interpret=interpret)
    out = chunk_o.output(
        q, k, v_new, h, b, scale=options.scale, chunk_size=size, interpret=interpret
    )
    return out, final, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta(q, k, v, beta, b, h0, options: Options):
    """Padded ``(o, final)``: ``q, k [B, L, H, K]``, ``v [B, L, H, V]`` (one dtype),
    ``beta [B, L, H]`` and ``b [B, L, H]`` (or ``None``) float32, ``h0 [B, H, K, V]``
    float32."""
    out, final, _ = _forward(q, k, v, beta, b, h0, options)
    return out, final


def _delta_fwd(q, k, v, beta, b, h0, options: Options):
    out, final, t = _forward(q, k, v, beta, b, h0, options)
    return (out, final), (q, k, v, beta, b, h0, t)


def _delta_bwd(options: Options, residuals, cotangents):
    q, k, v, beta, b, h0, t = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(q.dtype)
    size, interpret, scale = options.chunk_size, options.interpret, options.scale
    w, u = wy.recompute(k, v, beta, b, t, chunk_size=size, interpret=interpret)
    h, v_new, _ = delta_h.forward(k, w, u, b, h0, chunk_size=size, interpret=interpret)
    dv_local = local_value_backward(
        q, k, d_out, b, scale=scale, chunk_size=size, interpret=interpret
    )
    dh, d_values, d_h0 = delta_h.backward(
        q,
        k,
        w,
        d_out,
        dv_local,
        b,
        d_final.astype(F32),
        scale=scale,
        chunk_size=size,
        interpret=interpret,
    )
    dq, dk_out, dw, db_out = query_key_backward(
        q, k, v_new, h, d_out, d_values, dh, b, scale=scale, chunk_size=size, interpret=interpret
    )
    dk, dv, dbeta, db_wy = wy.backward(
        k, v, beta, b, t, dw, d_values, dk_out, chunk_size=size, interpret=interpret
    )
    db = None
    if b is not None:
        assert db_out is not None and db_wy is not None  # both given with a gate
        db = db_out + db_wy
    return dq, dk, dv, dbeta, db, d_h0


_delta.defvjp(_delta_fwd, _delta_bwd)


# -- the outputs' share of the backward ---------------------------------------------------------


def _params(
    config: GradConfig, num_warps: int | None = None, num_stages: int | None = None
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


def _decay(b: jax.Array | None, chunk_size: int, *, transposed: bool = False) -> jax.Array:
    """``Γ_ij = e^{b_i − b_j} [j ≤ i]`` (``Γᵀ`` when ``transposed``) float32 ``[C, C]``; the
    0/1 causal mask without a gate."""
    mask = causal_mask(chunk_size)
    if transposed:
        mask = ~causal_mask(chunk_size, strict=True)
    if b is None:
        return jnp.where(mask, 1.0, 0.0).astype(F32)
    diff = b[None, :] - b[:, None] if transposed else b[:, None] - b[None, :]
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _last(b: jax.Array) -> jax.Array:
    rows = jax.lax.broadcasted_iota(jnp.int32, b.shape, 0)
    return jnp.sum(jnp.where(rows == b.shape[0] - 1, b, 0.0))


def _loop(num: int, body, init):
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(num), body, init)


def _cols(i, block: int):
    return pl.ds(pl.multiple_of(i * block, block), block)


def _local_value_kernel(q_ref, k_ref, do_ref, *refs, scale: float, block_k: int):
    """``dv_local = scale (q kᵀ ⊙ Γ)ᵀ do`` for one ``[C, BV]`` tile."""
    b_ref = refs[0] if len(refs) == 2 else None
    dv_ref = refs[-1]
    chunk_size, key_width = q_ref.shape

    def body(i, scores_t):
        cols = _cols(i, block_k)
        return scores_t + mm(k_ref[:, cols], q_ref[:, cols], trans_b=True)  # [j, i] = k_j·q_i

    scores_t = _loop(key_width // block_k, body, jnp.zeros((chunk_size, chunk_size), F32))
    b = b_ref[...] if b_ref is not None else None
    do = do_ref[...]
    scores_t = (scale * scores_t * _decay(b, chunk_size, transposed=True)).astype(do.dtype)
    dv_ref[...] = mm(scores_t, do).astype(dv_ref.dtype)


def local_value_backward(
    q: jax.Array,
    k: jax.Array,
    do: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: GradConfig = CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """``scale (Q Kᵀ ⊙ Γ)ᵀ dO`` per chunk: ``[B, L, H, V]`` in ``do``'s dtype."""
    batch, length, heads, key_width = q.shape
    value_width = do.shape[-1]
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    full = _token_spec(chunk_size, key_width, heads, blocked=False)
    tile = _token_spec(chunk_size, bv, heads, blocked=True)
    in_specs = [full, full, tile]
    inputs = [q, k, do]
    if b is not None:
        in_specs.append(_gate_spec(chunk_size, heads))
        inputs.append(b.astype(F32))
    kernel = lambda *refs: _local_value_kernel(*refs, scale=float(scale), block_k=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(do.shape, do.dtype),
        grid=(value_width // bv, length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=_params(config),
        interpret=interpret,
        name="delta_rule_output_bwd_dv",
    )(*inputs)


def _query_key_kernel(
    q_ref, k_ref, v_ref, h_ref, do_ref, dv_ref, dh_ref, *refs, scale: float, block_v: int
):
    """``dq``, the scores' and state update's ``dk``, ``dw = −dv hᵀ`` for one ``[C, BK]``
    column block, and its share of ``db``."""
    gated = len(refs) == 5
    b_ref = refs[0] if gated else None
    dq_ref, dk_ref, dw_ref = refs[-4:-1] if gated else refs
    db_ref = refs[-1] if gated else None
    chunk_size, block_k = q_ref.shape
    value_width = v_ref.shape[1]

    def body(i, carry):
        dq, dk, dw, dscores, hdh = carry
        cols = _cols(i, block_v)
        do, v, dv = do_ref[:, cols], v_ref[:, cols], dv_ref[:, cols]
        h, dh = h_ref[:, cols], dh_ref[:, cols]
        dq = dq + mm(do, h, trans_b=True)
        dk = dk + mm(v, dh, trans_b=True)
        dw = dw - mm(dv, h, trans_b=True)
        dscores = dscores + mm(do, v, trans_b=True)
        if gated:
            hdh = hdh + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)
        return dq, dk, dw, dscores, hdh

    tile = jnp.zeros((chunk_size, block_k), F32)
    init = (tile, tile, tile, jnp.zeros((chunk_size, chunk_size), F32), jnp.zeros((block_k,), F32))
    dq_inter, dk_inter, dw, dscores, hdh = _loop(value_width // block_v, body, init)
    dw_ref[...] = dw.astype(dw_ref.dtype)
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
    v_new: jax.Array,
    h: jax.Array,
    do: jax.Array,
    dv_new: jax.Array,
    dh: jax.Array,
    b: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: GradConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dw, db)`` of the outputs and the state update given the pseudo-values
    ``v_new`` and their cotangent ``dv_new``, ``h`` the states entering each chunk and
    ``dh`` the cotangents of those leaving it.

    ``dq`` in ``q``'s dtype, ``dk`` float32 (a partial sum, finished by ``wy.backward``),
    ``dw = −dv_new hᵀ`` in ``q``'s dtype, ``db [B, L, H]`` float32 (``None`` without a
    gate).
    """
    batch, length, heads, key_width = q.shape
    value_width = v_new.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    num_k = key_width // bk
    tile = _token_spec(chunk_size, bk, heads, blocked=True)
    full = _token_spec(chunk_size, value_width, heads, blocked=False)
    state = pl.BlockSpec(
        (None, None, None, bk, value_width), lambda i, n, bh: (bh // heads, n, bh % heads, i, 0)
    )
    in_specs = [tile, tile, full, state, full, full, state]
    inputs = [q, k, v_new, h, do, dv_new, dh]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, F32),
        jax.ShapeDtypeStruct(k.shape, q.dtype),
    ]
    out_specs = [tile, tile, tile]
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
            config, config.query_key_num_warps, 1 if q.dtype.itemsize >= 4 else None
        ),
        interpret=interpret,
        name="delta_rule_output_bwd_dqkw",
    )(*inputs)
    db = jnp.sum(results[3], axis=0) if b is not None else None
    return results[0], results[1], results[2], db
