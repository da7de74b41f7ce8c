"""The delta rule's chunk-local WY/UT transform on GPUs: forward, recomputation, backward.

Per chunk of ``C`` tokens of one head, ``b`` the chunk-local cumulative log decay
(the compensated pair ``(hi, lo)`` of float32 arrays, ``gates.py``: ``Γ``'s exponents
are ``tiles.gap`` differences, ``e^{b}`` takes ``hi``; ``None``: no gate), ``β`` the
step sizes and ``Γ_ij = e^{b_i − b_j} [j < i]``
(masked before the ``exp``)::

    A = diag(β)(K Kᵀ) ⊙ Γ            (strictly lower)       T = (I + A)⁻¹
    X = diag(β)(K ⊙ e^{b}),  Y = diag(β) V,   W = T X,  U = T Y

so that the delta rule's pseudo-values of the chunk are ``U − W h`` (``delta_h.py``).

Kernels (every grid ``(N, B·H)``):

* :func:`inverse` writes ``T``. ``A`` comes from one ``[C, C]`` product ``K Kᵀ``
  (accumulated over ``K`` tiles) and is split into ``S×S`` blocks (``S = 16``, ``C/S``
  along each side); the diagonal blocks are inverted by forward substitution
  (``S − 1`` steps of a ``fori_loop`` of exact float32 row/column reductions, no
  matmul), the blocks below by ``T_ij = −T_ii Σ_{j ≤ m < i} A_im T_mj`` (``S×S``
  matmuls in IEEE float32; fla's ``solve_tril``). The kernel keeps the transposed
  blocks ``T_ijᵀ`` (what the substitution gives without transposes).
* :func:`recompute` computes ``W, U`` from ``T`` (the forward's second kernel, and the
  backward's recomputation); :func:`forward` is the two.
* :func:`backward`, below.

Backward (``W``, ``U`` given cotangents ``dW``, ``dU``)::

    dX = Tᵀ dW,  dY = Tᵀ dU,  dT = tril(dW Xᵀ + dU Yᵀ),  dA = −strict(Tᵀ dT Tᵀ)
    dk = dX ⊙ β e^{b} + (M + Mᵀ) K  with  M = dA ⊙ Γ ⊙ β_i,   dv = dY ⊙ β
    dβ_i = Σ (dX ⊙ K e^{b})_i + Σ (dY ⊙ V)_i + Σ_j dA_ij (K Kᵀ)_ij Γ_ij
    db_i = Σ (dX ⊙ X)_i + Σ_j (dA ⊙ A)_ij − Σ_j (dA ⊙ A)_ji

Shapes: ``k [B, L, H, K]``, ``v [B, L, H, V]`` (one dtype), ``beta, b [B, L, H]``
float32, ``t [B, L, H, C]`` (row ``i`` of chunk ``n`` holds row ``i`` of that
chunk's ``T``, input dtype). Every grid is ``(N, B·H)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import specs
from .tiles import F32, block_slice, causal_mask, col_ids, decay, loop, mm, row_ids


@dataclasses.dataclass(frozen=True)
class WYConfig:
    """Tiling of the WY kernels.

    Attributes:
      sub_block: side of the diagonal blocks inverted by substitution (16: the
        smallest ``dot``).
      block_k, block_v: feature tiles of the loops over ``K`` / ``V``.
      inverse_num_warps, backward_num_warps: Triton's ``num_warps`` for :func:`inverse`
        and :func:`backward` (8 halves the registers of 4 and so avoids spills; the
        ``S×S`` tiles of the inverse are replicated across warps).
      num_warps: for :func:`recompute`.
      num_stages: Triton's pipelining stages.
    """

    sub_block: int = 16
    block_k: int = 64
    block_v: int = 64
    inverse_num_warps: int = 8
    backward_num_warps: int = 8
    num_warps: int = 4
    num_stages: int = 1


CONFIG = WYConfig()


def _params(config: WYConfig, num_warps: int | None = None) -> pltriton.CompilerParams:
    warps = config.num_warps if num_warps is None else num_warps
    return specs.compiler_params(warps, config.num_stages)


def _token_spec(chunk_size: int, width: int, heads: int) -> pl.BlockSpec:
    """Chunk ``n``'s ``[C, width]`` tile of a ``[B, L, H, width]`` array."""
    return specs.token_spec(chunk_size, width, heads, lambda n, bh: (bh, n, 0))


def _row_spec(chunk_size: int, heads: int) -> pl.BlockSpec:
    """Chunk ``n``'s ``[C]`` slice of a ``[B, L, H]`` array."""
    return specs.row_spec(chunk_size, heads, lambda n, bh: (bh, n))


def _mm_exact(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """``a @ op(b)`` of float32 operands in IEEE float32 (not TF32): the inverse's merges."""
    return jax.lax.dot_general(
        a,
        b,
        (((1,), (1 if trans_b else 0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=F32,
    )


def _diagonal_inverses_t(blocks: list[jax.Array]) -> list[jax.Array]:
    """``[(I + A)⁻¹ᵀ]`` for strictly lower ``S×S`` float32 blocks, by forward substitution.

    Column ``s`` of ``Tᵀ`` (row ``s`` of ``T``) is ``e_s − Σ_{j<s} A_sj Tᵀ[:, j]``: row
    ``s`` of ``A`` as ``[1, S]`` (a reduction over rows), times ``Tᵀ``, summed along
    columns — the columns ``j ≥ s`` still hold ``e_j`` and meet ``A_sj = 0``.
    """
    size = blocks[0].shape[0]
    rows, cols = row_ids(size, size), col_ids(size, size)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(F32)

    def step(s, inverses):
        updated = []
        for a, inverse_t in zip(blocks, inverses):
            a_row = jnp.sum(jnp.where(rows == s, a, 0.0), axis=0, keepdims=True)  # [1, S]
            column = jnp.sum(a_row * inverse_t, axis=1, keepdims=True)  # [S, 1]
            updated.append(jnp.where(cols == s, eye - column, inverse_t))
        return tuple(updated)

    start = tuple(eye for _ in blocks)
    return list(jax.lax.fori_loop(jnp.int32(1), jnp.int32(size), step, start))


def _inverse_kernel(k_ref, beta_ref, *refs, sub: int, block_k: int):
    gate_refs = refs[:2] if len(refs) == 3 else None
    t_ref = refs[-1]
    chunk_size, key_width = k_ref.shape
    num = chunk_size // sub

    # A = diag(β)(K Kᵀ) ⊙ Γ (strictly lower) as one [C, C] array, then its S×S blocks.
    def body(c, kk):
        tile = k_ref[:, block_slice(c, block_k)]
        return kk + mm(tile, tile, trans_b=True)

    kk = loop(key_width // block_k, body, jnp.zeros((chunk_size, chunk_size), F32))
    beta = beta_ref[...]
    strict = causal_mask(chunk_size, strict=True)
    if gate_refs is not None:
        b = tuple(ref[...] for ref in gate_refs)
        gamma = jnp.where(strict, decay(b, chunk_size), 0.0)  # e^{b_i − b_j}, j < i
        a_full = kk * beta[:, None] * gamma
    else:
        a_full = jnp.where(strict, kk * beta[:, None], 0.0)
    a = {}
    for i, panel in enumerate(jnp.split(a_full, num, axis=0)):
        for j, block in enumerate(jnp.split(panel, num, axis=1)):
            if j <= i:
                a[i, j] = block

    # Tᵀ in blocks: substitution on the diagonal, then T_ij = −T_ii Σ_m A_im T_mj.
    diagonal = _diagonal_inverses_t([a[i, i] for i in range(num)])
    inverse_t = {(i, i): block for i, block in enumerate(diagonal)}
    for distance in range(1, num):
        for j in range(num - distance):
            i = j + distance
            acc = _mm_exact(inverse_t[j, j], a[i, j], trans_b=True)
            for m in range(j + 1, i):
                acc = acc + _mm_exact(inverse_t[m, j], a[i, m], trans_b=True)
            inverse_t[i, j] = -_mm_exact(acc, inverse_t[i, i])  # (T_ij)ᵀ
    zeros = jnp.zeros((sub, sub), t_ref.dtype)
    for i in range(num):
        for j in range(num):
            block = inverse_t[i, j].T.astype(t_ref.dtype) if j <= i else zeros
            t_ref[pl.ds(i * sub, sub), pl.ds(j * sub, sub)] = block


def inverse(
    k: jax.Array,
    beta: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    *,
    chunk_size: int,
    config: WYConfig = CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """``t [B, L, H, C]`` (``k``'s dtype): row ``i`` of chunk ``n`` is row ``i`` of that
    chunk's ``T = (I + A)⁻¹``; ``beta``, ``b [B, L, H]`` (``b`` may be ``None``)."""
    batch, length, heads, key_width = k.shape
    if chunk_size % config.sub_block:
        raise ValueError(f"chunk {chunk_size} is not a multiple of {config.sub_block}")
    in_specs = [_token_spec(chunk_size, key_width, heads), _row_spec(chunk_size, heads)]
    inputs = [k, beta.astype(F32)]
    if b is not None:
        for part in b:  # the compensated pair (hi, lo)
            in_specs.append(_row_spec(chunk_size, heads))
            inputs.append(part.astype(F32))
    bk = min(config.block_k, key_width)
    kernel = lambda *refs: _inverse_kernel(*refs, sub=config.sub_block, block_k=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, chunk_size), k.dtype),
        grid=(length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=_token_spec(chunk_size, chunk_size, heads),
        compiler_params=_params(config, config.inverse_num_warps),
        interpret=interpret,
        name="delta_rule_wy_inverse",
    )(*inputs)


def forward(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    *,
    chunk_size: int,
    config: WYConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(w [B, L, H, K], u [B, L, H, V], t [B, L, H, C])`` in the dtype of ``k, v``:
    :func:`inverse`, then :func:`recompute`."""
    t = inverse(k, beta, b, chunk_size=chunk_size, config=config, interpret=interpret)
    w, u = recompute(k, v, beta, b, t, chunk_size=chunk_size, config=config, interpret=interpret)
    return w, u, t


# -- recomputation of W, U from the saved T (backward) -------------------------------------


def _recompute_kernel(k_ref, v_ref, beta_ref, t_ref, *refs, block_k: int, block_v: int):
    gated = len(refs) == 3
    b_ref = refs[0] if gated else None
    w_ref, u_ref = refs[-2:]
    transform = t_ref[...]
    scale = beta_ref[...]
    if b_ref is not None:
        scale_k = scale * jnp.exp(b_ref[...])
    else:
        scale_k = scale

    def apply(src_ref, dst_ref, factor, block):
        def body(i, carry):
            cols = block_slice(i, block)
            x = (src_ref[:, cols].astype(F32) * factor[:, None]).astype(transform.dtype)
            dst_ref[:, cols] = mm(transform, x).astype(dst_ref.dtype)
            return carry

        loop(src_ref.shape[1] // block, body, 0)

    apply(k_ref, w_ref, scale_k, block_k)
    apply(v_ref, u_ref, scale, block_v)


def recompute(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    t: jax.Array,
    *,
    chunk_size: int,
    config: WYConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(w, u)`` as :func:`forward` gives them, from its saved ``t``."""
    batch, length, heads, key_width = k.shape
    value_width = v.shape[-1]
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    k_spec, v_spec = (
        _token_spec(chunk_size, key_width, heads),
        _token_spec(chunk_size, value_width, heads),
    )
    in_specs = [
        k_spec,
        v_spec,
        _row_spec(chunk_size, heads),
        _token_spec(chunk_size, chunk_size, heads),
    ]
    inputs = [k, v, beta.astype(F32), t]
    if b is not None:  # e^{b} only: hi
        in_specs.append(_row_spec(chunk_size, heads))
        inputs.append(b[0].astype(F32))
    kernel = lambda *refs: _recompute_kernel(*refs, block_k=bk, block_v=bv)
    w, u = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=[k_spec, v_spec],
        compiler_params=_params(config),
        interpret=interpret,
        name="delta_rule_wy_recompute",
    )(*inputs)
    return w, u


# -- backward ----------------------------------------------------------------------------------


def _backward_kernel(
    k_ref, v_ref, beta_ref, t_ref, dw_ref, du_ref, dk_in_ref, *refs, block_k: int, block_v: int
):
    gated = len(refs) == 6
    gate_refs = refs[:2] if gated else None
    dk_ref, dv_ref, dbeta_ref = refs[-4:-1] if gated else refs[-3:]
    db_ref = refs[-1] if gated else None
    chunk_size, key_width = k_ref.shape
    value_width = v_ref.shape[1]
    transform = t_ref[...]
    dtype = transform.dtype
    beta = beta_ref[...]
    b = gate_refs[0][...] if gate_refs is not None else None  # hi; lo is read where used
    k_factor = beta * jnp.exp(b) if b is not None else beta  # X = K ⊙ k_factor
    e_b = jnp.exp(b)[:, None] if b is not None else None
    zeros_c = jnp.zeros((chunk_size,), F32)

    def key_pass(i, carry):
        d_t, dbeta, db = carry
        cols = block_slice(i, block_k)
        k, dw = k_ref[:, cols], dw_ref[:, cols]
        x = k.astype(F32) * k_factor[:, None]
        d_t = d_t + mm(dw, x.astype(dtype), trans_b=True)
        dx = mm(transform, dw, trans_a=True)  # Tᵀ dW
        k_scaled = k.astype(F32) if e_b is None else k.astype(F32) * e_b
        dbeta = dbeta + jnp.sum(dx * k_scaled, axis=1)
        if b is not None:
            db = db + jnp.sum(dx * x, axis=1)
        return d_t, dbeta, db

    def value_pass(i, carry):
        d_t, dbeta = carry
        cols = block_slice(i, block_v)
        v, du = v_ref[:, cols], du_ref[:, cols]
        y = v.astype(F32) * beta[:, None]
        d_t = d_t + mm(du, y.astype(dtype), trans_b=True)
        dy = mm(transform, du, trans_a=True)  # Tᵀ dU
        dbeta = dbeta + jnp.sum(dy * v.astype(F32), axis=1)
        dv_ref[:, cols] = (dy * beta[:, None]).astype(dv_ref.dtype)
        return d_t, dbeta

    square = jnp.zeros((chunk_size, chunk_size), F32)
    d_t, dbeta, db = loop(key_width // block_k, key_pass, (square, zeros_c, zeros_c))
    d_t, dbeta = loop(value_width // block_v, value_pass, (d_t, dbeta))

    d_t = jnp.where(causal_mask(chunk_size), d_t, 0.0).astype(dtype)
    d_a = mm(mm(transform, d_t, trans_a=True).astype(dtype), transform, trans_b=True)
    strict = causal_mask(chunk_size, strict=True)
    if b is not None and gate_refs is not None:
        d_a = -d_a * decay((b, gate_refs[1][...]), chunk_size)  # dA ⊙ Γ
        d_a = jnp.where(strict, d_a, 0.0)  # (0 off the strict lower triangle)
    else:
        d_a = jnp.where(strict, -d_a, 0.0)

    def gram(i, kk):
        k = k_ref[:, block_slice(i, block_k)]
        return kk + mm(k, k, trans_b=True)

    kk = loop(key_width // block_k, gram, square)  # K Kᵀ, after T and dT are done with
    dbeta = dbeta + jnp.sum(d_a * kk, axis=1)
    m = d_a * beta[:, None]  # M = dA ⊙ Γ ⊙ β_i
    if b is not None:
        pairs = m * kk  # dA ⊙ A
        db = db + jnp.sum(pairs, axis=1) - jnp.sum(pairs, axis=0)
    m = m.astype(dtype)

    def key_grad(i, carry):
        cols = block_slice(i, block_k)
        k, dw = k_ref[:, cols], dw_ref[:, cols]
        dx = mm(transform, dw, trans_a=True)
        dk = dk_in_ref[:, cols].astype(F32) + dx * k_factor[:, None]
        dk = dk + mm(m, k) + mm(m, k, trans_a=True)
        dk_ref[:, cols] = dk.astype(dk_ref.dtype)
        return carry

    loop(key_width // block_k, key_grad, 0)
    dbeta_ref[...] = dbeta
    if db_ref is not None:
        db_ref[...] = db


def backward(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    t: jax.Array,
    dw: jax.Array,
    du: jax.Array,
    dk_in: jax.Array,
    *,
    chunk_size: int,
    config: WYConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dk, dv, dbeta, db)`` through ``W = T X``, ``U = T Y`` and ``T = (I + A)⁻¹``.

    ``dw [B, L, H, K]``, ``du [B, L, H, V]`` (input dtype): the cotangents of ``w, u``;
    ``dk_in`` (any float dtype) is added to ``dk`` (the other paths' share). Returns
    ``dk, dv`` in the dtypes of ``k, v``, ``dbeta`` and ``db`` float32 ``[B, L, H]``
    (``db`` is ``None`` without a gate).
    """
    batch, length, heads, key_width = k.shape
    value_width = v.shape[-1]
    bk, bv = min(config.block_k, key_width), min(config.block_v, value_width)
    k_spec, v_spec = (
        _token_spec(chunk_size, key_width, heads),
        _token_spec(chunk_size, value_width, heads),
    )
    row = _row_spec(chunk_size, heads)
    in_specs = [
        k_spec,
        v_spec,
        row,
        _token_spec(chunk_size, chunk_size, heads),
        k_spec,
        v_spec,
        k_spec,
    ]
    inputs = [k, v, beta.astype(F32), t, dw, du, dk_in]
    rows_shape = jax.ShapeDtypeStruct((batch, length, heads), F32)
    out_shape = [
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        rows_shape,
    ]
    out_specs = [k_spec, v_spec, row]
    if b is not None:
        in_specs += [row, row]
        inputs += [part.astype(F32) for part in b]  # the compensated pair (hi, lo)
        out_shape.append(rows_shape)
        out_specs.append(row)
    kernel = lambda *refs: _backward_kernel(*refs, block_k=bk, block_v=bv)
    results = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(length // chunk_size, batch * heads),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_params(config, config.backward_num_warps),
        interpret=interpret,
        name="delta_rule_wy_bwd",
    )(*inputs)
    db = results[3] if b is not None else None
    return results[0], results[1], results[2], db
