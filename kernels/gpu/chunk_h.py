"""The state recurrence over chunks, the only sequential part (forward and backward).

Scalar gate, chunk ``n`` (``C`` tokens), ``b`` the chunk-local cumulative log decay
(``b_i = Σ_{s ≤ i} g_s`` inside the chunk, the compensated pair ``(hi, lo)`` of float32
``[B, L, H]``, ``gates.py``; ``None``: no gate)::

    h_{n+1} = e^{b_last} h_n + (k ⊙ e^{b_last − b})ᵀ v                 (forward)
    dh_{n−1} = e^{b_last} dh_n + scale · (q ⊙ e^{b})ᵀ do                (backward)

Shapes: ``q, k [B, L, H, K]``, ``v, do [B, L, H, V]`` (token-major, ``L`` a multiple
of the chunk, ``K, V`` powers of two ≥ 16: ``layout.py``), states ``[B, H, K, V]``
float32 and per-chunk states ``[B, N, H, K, V]`` (``N = L / C``).

Grid ``(V/BV, K/BK, B·H)``: each program owns a ``[BK, BV]`` float32 tile of one
head's state and walks the chunks in a ``fori_loop`` (the ``[L, BK]``/``[L, BV]``
token blocks of its head are read one ``[C, ·]`` tile at a time). The tile is
shrunk until ``B·H`` heads give enough programs to fill the GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import specs
from .tiles import F32, gap, mm


@dataclasses.dataclass(frozen=True)
class StateConfig:
    """Tiling of the state kernels.

    Attributes:
      block_k, block_v: the largest state tile ``[BK, BV]`` one program owns.
      min_block_k, min_block_v: the smallest the tile is shrunk to for more programs.
      min_programs: shrink the tile (``BK`` first) while the grid has fewer programs.
      num_warps, num_stages: Triton launch parameters.
    """

    block_k: int = 64
    block_v: int = 32
    min_block_k: int = 32
    min_block_v: int = 16
    min_programs: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def blocks(self, key_width: int, value_width: int, heads: int) -> tuple[int, int]:
        """``(BK, BV)`` for padded widths ``K, V`` and ``heads = B·H``."""
        bk, bv = min(self.block_k, key_width), min(self.block_v, value_width)

        def programs() -> int:
            return (key_width // bk) * (value_width // bv) * heads

        while programs() < self.min_programs and bk > self.min_block_k:
            bk //= 2
        while programs() < self.min_programs and bv > self.min_block_v:
            bv //= 2
        return bk, bv


CONFIG = StateConfig()


def chunk_decay(b_ref, start, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """The chunk's ``b [C]`` (float32) and its last entry ``b_last`` (a scalar)."""
    b = b_ref[pl.ds(start, chunk_size)]
    return b, b_ref[start + chunk_size - 1]


def to_end(b_ref, lo_ref, start, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """``(b_last − b [C], b_last)`` of the chunk at ``start`` from the compensated pair's
    refs (the difference exact after a strong gate, ``tiles.gap``)."""
    b, b_last = chunk_decay(b_ref, start, chunk_size)
    lo, lo_last = chunk_decay(lo_ref, start, chunk_size)
    return gap(b_last, lo_last, b, lo), b_last


def _token_spec(length: int, width: int, heads: int, feature_axis: int) -> pl.BlockSpec:
    """A head's ``[L, width]`` column block of a ``[B, L, H, D]`` array; the feature block
    index is grid axis ``feature_axis``."""
    return specs.token_spec(length, width, heads, lambda i, j, bh: (bh, 0, (i, j)[feature_axis]))


def _state_spec(bk: int, bv: int, heads: int) -> pl.BlockSpec:
    """The ``[BK, BV]`` tile of a ``[B, H, K, V]`` state."""
    return specs.state_spec(bk, bv, heads, lambda i, j, bh: (bh, j, i))


def _scan_kernel(
    *refs, gated: bool, has_init: bool, reverse: bool, scale: float, chunk_size: int, num_chunks
):
    """``state ← e^{b_last} state + s · (x ⊙ e^{w})ᵀ y`` over the chunks, saving every
    chunk's incoming tile; forward: ``x = k``, ``w = b_last − b``, ``s = 1``;
    backward (``reverse``): ``x = q``, ``w = b``, ``s = scale``."""
    x_ref, y_ref, *refs = refs
    b_ref, lo_ref = (refs.pop(0), refs.pop(0)) if gated else (None, None)
    init_ref = refs.pop(0) if has_init else None
    states_ref, last_ref = refs
    state = init_ref[...].astype(F32) if init_ref is not None else jnp.zeros(last_ref.shape, F32)

    def body(i, state):
        n = num_chunks - 1 - i if reverse else i
        start = pl.multiple_of(n * chunk_size, chunk_size)
        states_ref[n] = state.astype(states_ref.dtype)
        x = x_ref[pl.ds(start, chunk_size), :]
        y = y_ref[pl.ds(start, chunk_size), :]
        if b_ref is not None:
            if reverse:
                weight, b_last = chunk_decay(b_ref, start, chunk_size)
            else:
                weight, b_last = to_end(b_ref, lo_ref, start, chunk_size)
            x = (x * jnp.exp(weight)[:, None]).astype(x.dtype)
            state = state * jnp.exp(b_last)
        update = mm(x, y, trans_a=True)
        return state + (update * scale if scale != 1.0 else update)

    last_ref[...] = jax.lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), body, state)


def _scan(x, y, b, init, *, reverse, scale, chunk_size, states_dtype, config, interpret, name):
    batch, length, heads, key_width = x.shape
    value_width = y.shape[-1]
    if length % chunk_size:
        raise ValueError(f"{name}: length {length} is not a multiple of the chunk {chunk_size}")
    num_chunks = length // chunk_size
    bk, bv = config.blocks(key_width, value_width, batch * heads)
    gated, has_init = b is not None, init is not None
    in_specs = [_token_spec(length, bk, heads, 1), _token_spec(length, bv, heads, 0)]
    inputs = [x, y]
    if gated:
        for part in b:  # the compensated pair (hi, lo)
            in_specs.append(specs.row_spec(length, heads, lambda i, j, bh: (bh, 0)))
            inputs.append(part.astype(F32))
    if has_init:
        in_specs.append(_state_spec(bk, bv, heads))
        inputs.append(init.astype(F32))
    kernel = lambda *refs: _scan_kernel(
        *refs,
        gated=gated,
        has_init=has_init,
        reverse=reverse,
        scale=scale,
        chunk_size=chunk_size,
        num_chunks=num_chunks,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_chunks, heads, key_width, value_width), states_dtype),
            jax.ShapeDtypeStruct((batch, heads, key_width, value_width), F32),
        ),
        grid=(value_width // bv, key_width // bk, batch * heads),
        in_specs=in_specs,
        out_specs=(
            specs.chunk_state_spec(num_chunks, bk, bv, heads, lambda i, j, bh: (bh, 0, j, i)),
            _state_spec(bk, bv, heads),
        ),
        compiler_params=specs.compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


def state_forward(
    k: jax.Array,
    v: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    h0: jax.Array | None,
    *,
    chunk_size: int,
    config: StateConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The states entering every chunk and the final state.

    Args:
      k: ``[B, L, H, K]``; v: ``[B, L, H, V]`` (same dtype).
      b: chunk-local cumulative log decay, the pair ``(hi, lo)`` of float32 ``[B, L, H]``
        (``layout.chunk_gate``), or ``None`` (no gate).
      h0: initial state ``[B, H, K, V]`` (``None``: zeros).

    Returns:
      ``(h [B, N, H, K, V]`` in ``k.dtype`` — ``h[:, n]`` enters chunk ``n`` —,
      ``final [B, H, K, V]`` float32).
    """
    return _scan(
        k,
        v,
        b,
        h0,
        reverse=False,
        scale=1.0,
        chunk_size=chunk_size,
        states_dtype=k.dtype,
        config=config,
        interpret=interpret,
        name="linear_attention_state_fwd",
    )


def state_backward(
    q: jax.Array,
    do: jax.Array,
    b: tuple[jax.Array, jax.Array] | None,
    d_final: jax.Array | None,
    *,
    scale: float,
    chunk_size: int,
    config: StateConfig = CONFIG,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The state cotangents, walking the chunks in reverse.

    Args:
      q: ``[B, L, H, K]``; do: the output cotangent ``[B, L, H, V]`` (same dtype).
      b: as :func:`state_forward`; d_final: the final state's cotangent ``[B, H, K, V]``
        (``None``: zeros).

    Returns:
      ``(dh [B, N, H, K, V]`` in ``q.dtype`` — ``dh[:, n]`` is the cotangent of the state
      *leaving* chunk ``n`` (``dh[:, N−1] = d_final``) —, ``d_h0 [B, H, K, V]`` float32).
    """
    return _scan(
        q,
        do,
        b,
        d_final,
        reverse=True,
        scale=float(scale),
        chunk_size=chunk_size,
        states_dtype=q.dtype,
        config=config,
        interpret=interpret,
        name="linear_attention_state_bwd",
    )
