"""The delta rule's state recurrence over chunks, the only sequential part (forward and backward).

Chunk ``n`` of one head (``C`` tokens), with ``w, u`` from the WY transform
(``wy.py``), ``b`` the chunk-local cumulative log decay (float32, ``None``: no
gate) and ``h_n`` the state entering the chunk (``h_0`` the initial state)::

    v_n     = u − w h_n                                            (pseudo-values)
    h_{n+1} = e^{b_last} h_n + (k ⊙ e^{b_last − b})ᵀ v_n

Backward, ``G_n`` the cotangent of ``h_{n+1}`` (``G_{N−1}`` the final state's) and
``dv_local = scale (q kᵀ ⊙ Γ)ᵀ do`` the outputs' share of ``dv_n``::

    dv_n    = dv_local + (k ⊙ e^{b_last − b}) G_n
    G_{n−1} = e^{b_last} G_n + scale (q ⊙ e^{b})ᵀ do − wᵀ dv_n

and ``G_{−1}`` is the initial state's cotangent.

Shapes: ``q, k, w [B, L, H, K]``, ``u, do, dv_local [B, L, H, V]`` (one dtype),
``b [B, L, H]``, states ``[B, H, K, V]`` float32, per-chunk states and their
cotangents ``[B, N, H, K, V]`` in the input dtype. Grid ``(V/BV, B·H)``: each
program owns all ``K`` rows of a ``[K, BV]`` float32 state, held as ``K/BK``
blocks of ``BK`` rows, and walks its head's chunks in a ``fori_loop``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .tiles import F32, mm


@dataclasses.dataclass(frozen=True)
class DeltaStateConfig:
    """Tiling of the state kernels.

    Attributes:
      block_k: rows of one state block (the state is ``K/BK`` of them).
      block_v: the most state columns one program owns.
      min_block_v: the fewest columns ``BV`` is shrunk to for more programs.
      min_programs: shrink ``BV`` while the grid has fewer programs than this.
      num_warps: Triton's ``num_warps`` when a token's key row takes at most
        ``wide_bytes`` (``K`` × item size: ``K ≤ 128`` in bf16, ``K ≤ 64`` in float32).
      wide_num_warps: for wider key rows.
      wide_slices: wider key rows also walk each chunk in this many row slices (an
        inner ``fori_loop``; the states still step once per chunk), so that few
        ``[rows, K]`` tiles are live at once.
      wide_bytes: see above.
      num_stages: Triton's pipelining stages.
    """

    block_k: int = 64
    block_v: int = 32
    min_block_v: int = 16
    min_programs: int = 64
    num_warps: int = 4
    wide_num_warps: int = 8
    wide_slices: int = 4
    wide_bytes: int = 256
    num_stages: int = 2

    def blocks(self, key_width: int, value_width: int, heads: int) -> tuple[int, int]:
        """``(BK, BV)`` for padded widths ``K, V`` and ``heads = B·H``."""
        bv = min(self.block_v, value_width)
        while (value_width // bv) * heads < self.min_programs and bv > self.min_block_v:
            bv //= 2
        return min(self.block_k, key_width), bv

    def params(self, key_width: int, dtype) -> pltriton.CompilerParams:
        """Launch parameters for padded ``K`` and the inputs' ``dtype``."""
        wide = key_width * jnp.dtype(dtype).itemsize > self.wide_bytes
        return pltriton.CompilerParams(
            num_warps=self.wide_num_warps if wide else self.num_warps,
            num_stages=self.num_stages,
        )

    def slices(self, key_width: int, dtype) -> int:
        """Row slices per chunk for padded ``K`` and the inputs' ``dtype``."""
        wide = key_width * jnp.dtype(dtype).itemsize > self.wide_bytes
        return self.wide_slices if wide else 1


CONFIG = DeltaStateConfig()


def _sequence_spec(length: int, width: int, heads: int, *, blocked: bool) -> pl.BlockSpec:
    """One head's whole ``[L, width]`` rows of a ``[B, L, H, D]`` array (grid axis 0 picks
    the ``width`` block when ``blocked``)."""
    return pl.BlockSpec(
        (None, length, None, width),
        lambda iv, bh: (bh // heads, 0, bh % heads, iv if blocked else 0),
    )


def _gate_spec(length: int, heads: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, length, None), lambda iv, bh: (bh // heads, 0, bh % heads))


def _state_spec(key_width: int, block_v: int, heads: int) -> pl.BlockSpec:
    return pl.BlockSpec(
        (None, None, key_width, block_v), lambda iv, bh: (bh // heads, bh % heads, 0, iv)
    )


def _states_spec(num_chunks: int, key_width: int, block_v: int, heads: int) -> pl.BlockSpec:
    return pl.BlockSpec(
        (None, num_chunks, None, key_width, block_v),
        lambda iv, bh: (bh // heads, 0, bh % heads, 0, iv),
    )


def _last(b: jax.Array) -> jax.Array:
    """The last entry of ``b [C]`` as a scalar (a masked sum)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, b.shape, 0)
    return jnp.sum(jnp.where(rows == b.shape[0] - 1, b, 0.0))


def _loop(num: int, body, init):
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(num), body, init)


def _blocks(num: int, block: int) -> list:
    return [pl.ds(i * block, block) for i in range(num)]


def _forward_kernel(k_ref, w_ref, u_ref, *refs, chunk_size: int, block_k: int, slices: int):
    gated = len(refs) == 5
    b_ref = refs[0] if gated else None
    h0_ref, h_ref, v_new_ref, final_ref = refs[-4:]
    length, key_width = k_ref.shape
    dtype = k_ref.dtype
    key_blocks = _blocks(key_width // block_k, block_k)
    size = chunk_size // slices

    def step(rows, casts, b_last, states):
        """``v = u − w h_n`` on ``rows`` (stored), then ``states += (k ⊙ e^{b_last − b})ᵀ v``."""
        values = u_ref[rows, :].astype(F32)
        for blk, cast in zip(key_blocks, casts):
            values = values - mm(w_ref[rows, blk], cast)
        v_new_ref[rows, :] = values.astype(v_new_ref.dtype)
        if b_ref is not None:
            values = values * jnp.exp(b_last - b_ref[rows])[:, None]
        values = values.astype(dtype)
        return tuple(
            state + mm(k_ref[rows, blk], values, trans_a=True)
            for blk, state in zip(key_blocks, states)
        )

    def body(n, states):
        start = pl.multiple_of(n * chunk_size, chunk_size)
        casts = tuple(state.astype(dtype) for state in states)
        for blk, cast in zip(key_blocks, casts):
            h_ref[n, blk, :] = cast.astype(h_ref.dtype)
        b_last = _last(b_ref[pl.ds(start, chunk_size)]) if b_ref is not None else None
        if b_last is not None:
            states = tuple(jnp.exp(b_last) * state for state in states)
        if slices == 1:
            return step(pl.ds(start, chunk_size), casts, b_last, states)

        def piece(i, states):
            rows = pl.ds(pl.multiple_of(start + i * size, size), size)
            return step(rows, casts, b_last, states)

        return _loop(slices, piece, states)

    init = tuple(h0_ref[blk, :] for blk in key_blocks)
    final = _loop(length // chunk_size, body, init)
    for blk, state in zip(key_blocks, final):
        final_ref[blk, :] = state


def forward(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    b: jax.Array | None,
    h0: jax.Array,
    *,
    chunk_size: int,
    config: DeltaStateConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(h [B, N, H, K, V], v_new [B, L, H, V], final [B, H, K, V])``: the states entering
    every chunk and the pseudo-values (input dtype), the final state (float32); ``h0``
    float32 ``[B, H, K, V]``."""
    batch, length, heads, key_width = k.shape
    value_width = u.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = config.blocks(key_width, value_width, batch * heads)
    full = _sequence_spec(length, key_width, heads, blocked=False)
    tile = _sequence_spec(length, bv, heads, blocked=True)
    in_specs = [full, full, tile]
    inputs = [k, w, u]
    if b is not None:
        in_specs.append(_gate_spec(length, heads))
        inputs.append(b.astype(F32))
    in_specs.append(_state_spec(key_width, bv, heads))
    inputs.append(h0.astype(F32))
    slices = config.slices(key_width, k.dtype)
    kernel = lambda *refs: _forward_kernel(*refs, chunk_size=chunk_size, block_k=bk, slices=slices)
    h, v_new, final = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_chunks, heads, key_width, value_width), k.dtype),
            jax.ShapeDtypeStruct(u.shape, u.dtype),
            jax.ShapeDtypeStruct((batch, heads, key_width, value_width), F32),
        ],
        grid=(value_width // bv, batch * heads),
        in_specs=in_specs,
        out_specs=[
            _states_spec(num_chunks, key_width, bv, heads),
            tile,
            _state_spec(key_width, bv, heads),
        ],
        compiler_params=config.params(key_width, k.dtype),
        interpret=interpret,
        name="delta_rule_state_fwd",
    )(*inputs)
    return h, v_new, final


def _backward_kernel(
    q_ref,
    k_ref,
    w_ref,
    do_ref,
    dv_local_ref,
    *refs,
    chunk_size: int,
    block_k: int,
    slices: int,
    scale: float,
):
    gated = len(refs) == 5
    b_ref = refs[0] if gated else None
    d_final_ref, dh_ref, dv_ref, dh0_ref = refs[-4:]
    length, key_width = k_ref.shape
    dtype = k_ref.dtype
    key_blocks = _blocks(key_width // block_k, block_k)
    num_chunks = length // chunk_size
    size = chunk_size // slices

    def step(rows, casts, b_last, grads):
        """``dv = dv_local + (k ⊙ e^{b_last − b}) G_n`` on ``rows`` (stored), then
        ``grads += scale (q ⊙ e^b)ᵀ do − wᵀ dv``."""
        b = b_ref[rows] if b_ref is not None else None
        d_values = dv_local_ref[rows, :].astype(F32)
        for blk, cast in zip(key_blocks, casts):
            k = k_ref[rows, blk]
            if b is not None:
                k = (k.astype(F32) * jnp.exp(b_last - b)[:, None]).astype(dtype)
            d_values = d_values + mm(k, cast)
        dv_ref[rows, :] = d_values.astype(dv_ref.dtype)
        d_values = d_values.astype(dtype)
        do = do_ref[rows, :]
        updated = []
        for blk, grad in zip(key_blocks, grads):
            q = q_ref[rows, blk].astype(F32) * scale
            if b is not None:
                q = q * jnp.exp(b)[:, None]
            grad = grad + mm(q.astype(dtype), do, trans_a=True)
            updated.append(grad - mm(w_ref[rows, blk], d_values, trans_a=True))
        return tuple(updated)

    def body(i, grads):
        n = num_chunks - 1 - i
        start = pl.multiple_of(n * chunk_size, chunk_size)
        casts = tuple(grad.astype(dtype) for grad in grads)
        for blk, cast in zip(key_blocks, casts):
            dh_ref[n, blk, :] = cast.astype(dh_ref.dtype)
        b_last = _last(b_ref[pl.ds(start, chunk_size)]) if b_ref is not None else None
        if b_last is not None:
            grads = tuple(jnp.exp(b_last) * grad for grad in grads)
        if slices == 1:
            return step(pl.ds(start, chunk_size), casts, b_last, grads)

        def piece(j, grads):
            rows = pl.ds(pl.multiple_of(start + j * size, size), size)
            return step(rows, casts, b_last, grads)

        return _loop(slices, piece, grads)

    init = tuple(d_final_ref[blk, :] for blk in key_blocks)
    grads = _loop(num_chunks, body, init)
    for blk, grad in zip(key_blocks, grads):
        dh0_ref[blk, :] = grad


def backward(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    do: jax.Array,
    dv_local: jax.Array,
    b: jax.Array | None,
    d_final: jax.Array,
    *,
    scale: float,
    chunk_size: int,
    config: DeltaStateConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dh [B, N, H, K, V], dv [B, L, H, V], dh0 [B, H, K, V])``: the cotangents of the
    states leaving every chunk and of the pseudo-values (input dtype), and the initial
    state's (float32); ``d_final`` is the final state's cotangent."""
    batch, length, heads, key_width = k.shape
    value_width = do.shape[-1]
    num_chunks = length // chunk_size
    bk, bv = config.blocks(key_width, value_width, batch * heads)
    full = _sequence_spec(length, key_width, heads, blocked=False)
    tile = _sequence_spec(length, bv, heads, blocked=True)
    in_specs = [full, full, full, tile, tile]
    inputs = [q, k, w, do, dv_local]
    if b is not None:
        in_specs.append(_gate_spec(length, heads))
        inputs.append(b.astype(F32))
    in_specs.append(_state_spec(key_width, bv, heads))
    inputs.append(d_final.astype(F32))
    kernel = lambda *refs: _backward_kernel(
        *refs,
        chunk_size=chunk_size,
        block_k=bk,
        slices=config.slices(key_width, k.dtype),
        scale=float(scale),
    )
    dh, dv, dh0 = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_chunks, heads, key_width, value_width), k.dtype),
            jax.ShapeDtypeStruct(do.shape, dv_local.dtype),
            jax.ShapeDtypeStruct((batch, heads, key_width, value_width), F32),
        ],
        grid=(value_width // bv, batch * heads),
        in_specs=in_specs,
        out_specs=[
            _states_spec(num_chunks, key_width, bv, heads),
            tile,
            _state_spec(key_width, bv, heads),
        ],
        compiler_params=config.params(key_width, k.dtype),
        interpret=interpret,
        name="delta_rule_state_bwd",
    )(*inputs)
    return dh, dv, dh0
