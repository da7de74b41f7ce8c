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

from . import specs
from .tiles import F32, gap, last, loop, mm


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
    return specs.token_spec(length, width, heads, lambda iv, bh: (bh, 0, iv if blocked else 0))


def _state_spec(key_width: int, block_v: int, heads: int) -> pl.BlockSpec:
    return specs.state_spec(key_width, block_v, heads, lambda iv, bh: (bh, 0, iv))


def _blocks(num: int, block: int) -> list:
    return [pl.ds(i * block, block) for i in range(num)]


def _walk(
    step,
    gate_refs,
    init_ref,
    states_ref,
    last_ref,
    *,
    chunk_size: int,
    block_k: int,
    slices: int,
    reverse: bool,
) -> None:
    """Walk one head's chunks (last to first when ``reverse``) carrying the ``[K, BV]``
    float32 state as ``K/BK`` row blocks, from ``init_ref``: per chunk ``n`` store the
    entering state (input dtype) in ``states_ref[n]``, decay it by ``e^{b_last}``, then
    ``state = step(rows, casts, b_last, state)`` over the chunk's rows (in ``slices``
    pieces; ``casts`` the entering state in the input dtype; ``b_last`` the compensated
    pair's last entries ``(hi, lo)``, from ``gate_refs = (hi_ref, lo_ref)`` or ``None``).
    The last state goes to ``last_ref``."""
    key_width = init_ref.shape[0]
    num_chunks = states_ref.shape[0]
    dtype = states_ref.dtype
    key_blocks = _blocks(key_width // block_k, block_k)
    size = chunk_size // slices

    def body(i, states):
        n = num_chunks - 1 - i if reverse else i
        start = pl.multiple_of(n * chunk_size, chunk_size)
        casts = tuple(state.astype(dtype) for state in states)
        for blk, cast in zip(key_blocks, casts):
            states_ref[n, blk, :] = cast.astype(states_ref.dtype)
        b_last = None
        if gate_refs is not None:
            b_last = tuple(last(ref[pl.ds(start, chunk_size)]) for ref in gate_refs)
            states = tuple(jnp.exp(b_last[0]) * state for state in states)
        if slices == 1:
            return step(pl.ds(start, chunk_size), casts, b_last, states)

        def piece(j, states):
            rows = pl.ds(pl.multiple_of(start + j * size, size), size)
            return step(rows, casts, b_last, states)

        return loop(slices, piece, states)

    init = tuple(init_ref[blk, :] for blk in key_blocks)
    final = loop(num_chunks, body, init)
    for blk, state in zip(key_blocks, final):
        last_ref[blk, :] = state


def _forward_kernel(k_ref, w_ref, u_ref, *refs, chunk_size: int, block_k: int, slices: int):
    gate_refs = refs[:2] if len(refs) == 6 else None
    h0_ref, h_ref, v_new_ref, final_ref = refs[-4:]
    dtype = k_ref.dtype
    key_blocks = _blocks(k_ref.shape[1] // block_k, block_k)

    def step(rows, casts, b_last, states):
        """``v = u − w h_n`` on ``rows`` (stored), then ``states += (k ⊙ e^{b_last − b})ᵀ v``."""
        values = u_ref[rows, :].astype(F32)
        for blk, cast in zip(key_blocks, casts):
            values = values - mm(w_ref[rows, blk], cast)
        v_new_ref[rows, :] = values.astype(v_new_ref.dtype)
        if gate_refs is not None:
            (b_ref, lo_ref), (hi_last, lo_last) = gate_refs, b_last
            values = values * jnp.exp(gap(hi_last, lo_last, b_ref[rows], lo_ref[rows]))[:, None]
        values = values.astype(dtype)
        return tuple(
            state + mm(k_ref[rows, blk], values, trans_a=True)
            for blk, state in zip(key_blocks, states)
        )

    _walk(
        step,
        gate_refs,
        h0_ref,
        h_ref,
        final_ref,
        chunk_size=chunk_size,
        block_k=block_k,
        slices=slices,
        reverse=False,
    )


def _call(
    kernel,
    k: jax.Array,
    rows: list[jax.Array],
    cols: list[jax.Array],
    b: tuple[jax.Array, jax.Array] | None,
    state: jax.Array,
    *,
    chunk_size: int,
    config: DeltaStateConfig,
    interpret: bool,
    name: str,
    **static,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Launch a state kernel over the grid ``(V/BV, B·H)``: inputs ``rows`` (whole
    ``[L, K]`` key rows of a head), ``cols`` (its ``[L, BV]`` value block), ``b`` and the
    ``[K, BV]`` float32 ``state``; outputs the per-chunk states ``[B, N, H, K, V]`` (``k``'s
    dtype), a value-shaped array like ``cols[-1]`` and the last state (float32)."""
    batch, length, heads, key_width = k.shape
    value_width = cols[-1].shape[-1]
    num_chunks = length // chunk_size
    bk, bv = config.blocks(key_width, value_width, batch * heads)
    tile = _sequence_spec(length, bv, heads, blocked=True)
    in_specs = [_sequence_spec(length, key_width, heads, blocked=False)] * len(rows)
    in_specs += [tile] * len(cols)
    inputs = [*rows, *cols]
    if b is not None:
        for part in b:  # the compensated pair (hi, lo)
            in_specs.append(specs.row_spec(length, heads, lambda iv, bh: (bh, 0)))
            inputs.append(part.astype(F32))
    in_specs.append(_state_spec(key_width, bv, heads))
    inputs.append(state.astype(F32))
    slices = config.slices(key_width, k.dtype)
    body = lambda *refs: kernel(*refs, chunk_size=chunk_size, block_k=bk, slices=slices, **static)
    states, values, final = pl.pallas_call(
        body,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_chunks, heads, key_width, value_width), k.dtype),
            jax.ShapeDtypeStruct(cols[-1].shape, cols[-1].dtype),
            jax.ShapeDtypeStruct((batch, heads, key_width, value_width), F32),
        ],
        grid=(value_width // bv, batch * heads),
        in_specs=in_specs,
        out_specs=[
            specs.chunk_state_spec(num_chunks, key_width, bv, heads, lambda iv, bh: (bh, 0, 0, iv)),
            tile,
            _state_spec(key_width, bv, heads),
        ],
        compiler_params=config.params(key_width, k.dtype),
        interpret=interpret,
        name=name,
    )(*inputs)
    return states, values, final


def forward(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    h0: jax.Array,
    *,
    chunk_size: int,
    config: DeltaStateConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(h [B, N, H, K, V], v_new [B, L, H, V], final [B, H, K, V])``: the states entering
    every chunk and the pseudo-values (input dtype), the final state (float32); ``h0``
    float32 ``[B, H, K, V]``."""
    return _call(
        _forward_kernel,
        k,
        [k, w],
        [u],
        b,
        h0,
        chunk_size=chunk_size,
        config=config,
        interpret=interpret,
        name="delta_rule_state_fwd",
    )


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
    gate_refs = refs[:2] if len(refs) == 6 else None
    d_final_ref, dh_ref, dv_ref, dh0_ref = refs[-4:]
    dtype = k_ref.dtype
    key_blocks = _blocks(k_ref.shape[1] // block_k, block_k)

    def step(rows, casts, b_last, grads):
        """``dv = dv_local + (k ⊙ e^{b_last − b}) G_n`` on ``rows`` (stored), then
        ``grads += scale (q ⊙ e^b)ᵀ do − wᵀ dv``."""
        b = tuple(ref[rows] for ref in gate_refs) if gate_refs is not None else None
        to_end = jnp.exp(gap(*b_last, *b))[:, None] if b is not None else None
        d_values = dv_local_ref[rows, :].astype(F32)
        for blk, cast in zip(key_blocks, casts):
            k = k_ref[rows, blk]
            if to_end is not None:
                k = (k.astype(F32) * to_end).astype(dtype)
            d_values = d_values + mm(k, cast)
        dv_ref[rows, :] = d_values.astype(dv_ref.dtype)
        d_values = d_values.astype(dtype)
        do = do_ref[rows, :]
        updated = []
        for blk, grad in zip(key_blocks, grads):
            q = q_ref[rows, blk].astype(F32) * scale
            if b is not None:
                q = q * jnp.exp(b[0])[:, None]
            grad = grad + mm(q.astype(dtype), do, trans_a=True)
            updated.append(grad - mm(w_ref[rows, blk], d_values, trans_a=True))
        return tuple(updated)

    _walk(
        step,
        gate_refs,
        d_final_ref,
        dh_ref,
        dh0_ref,
        chunk_size=chunk_size,
        block_k=block_k,
        slices=slices,
        reverse=True,
    )


def backward(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    do: jax.Array,
    dv_local: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
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
    return _call(
        _backward_kernel,
        k,
        [q, k, w],
        [do, dv_local],
        b,
        d_final,
        chunk_size=chunk_size,
        config=config,
        interpret=interpret,
        name="delta_rule_state_bwd",
        scale=float(scale),
    )
