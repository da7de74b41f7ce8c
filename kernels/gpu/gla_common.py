"""What the per-channel gated linear attention (GLA) kernels share: tiling and helpers.

Every kernel sees one head's token-major tiles of the padded arrays
``[B, L, H, D]`` (``L`` a multiple of the chunk ``C``, ``D`` a power of two ≥ 16)
through BlockSpecs (``specs.py``), with ``B·H`` folded into one grid axis. Per chunk ``b [C, K]``
is the chunk-local cumulative per-channel log decay (float32, ≤ 0 and
non-increasing down the chunk); ``b_last`` its last row.

Exponents are kept ≤ 0: ``e^{b_i − b_j}`` only for ``j ≤ i``, ``e^{b_last − b}``,
``e^{b}``, and between 16-row sub-chunks through a reference row ``r`` with
``b_i ≤ r ≤ b_j``; everything masked is masked *before* the ``exp``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from . import specs
from .tiles import mm

F32 = jnp.float32
I32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class GLATiles:
    """Tiling of the GLA kernels (feature blocks are clipped to the padded widths).

    Attributes:
      chunk: tokens per chunk ``C`` (the unit of the state recurrence).
      sub_chunk: rows of one intra-chunk sub-block (the per-channel scores inside
        a sub-chunk are built one source row at a time).
      block_k, block_v: key/value feature tiles of the chunk-parallel kernels.
      state_block_k, state_block_v: the ``[BK, BV]`` float32 state tile of the two
        sequential state kernels.
      inter_block_v: the value tile the inter-chunk gradient kernel loops over (at
        ``block_v = 64`` a single-tile loop is flattened and, with float32 inputs,
        spills).
      num_warps: Triton's warps per program, for every kernel but the inter-chunk
        gradient one, which takes ``inter_warps`` (its ``[C, BK]`` float32
        accumulators and value-side tiles need 255 registers at 4 warps).
      num_stages: Triton's software-pipelining stages.
    """

    chunk: int = 64
    sub_chunk: int = 16
    block_k: int = 64
    block_v: int = 64
    state_block_k: int = 64
    state_block_v: int = 64
    inter_block_v: int = 32
    num_warps: int = 4
    inter_warps: int = 8
    num_stages: int = 1

    def __post_init__(self):
        sizes = (self.chunk, self.sub_chunk, self.block_k, self.block_v)
        sizes += (self.state_block_k, self.state_block_v, self.inter_block_v)
        if any(size < 16 or size & (size - 1) for size in sizes):
            raise ValueError(f"GLA tiles must be powers of two ≥ 16 (Triton's dot); got {self}")
        if self.chunk < self.sub_chunk:
            raise ValueError(f"the chunk must hold whole sub-chunks; got {self}")

    @property
    def num_sub(self) -> int:
        return self.chunk // self.sub_chunk


TILES = GLATiles()


def compiler_params(tiles: GLATiles, num_warps: int | None = None) -> pltriton.CompilerParams:
    warps = tiles.num_warps if num_warps is None else num_warps
    return specs.compiler_params(warps, tiles.num_stages)


def block(width: int, limit: int) -> int:
    """A feature tile: ``limit`` clipped to the (power-of-two) ``width``."""
    return min(width, limit)


def iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return jax.lax.broadcasted_iota(I32, shape, dim)


def masked_sum(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``where(mask, 1, 0) @ x`` for float32 ``x [C, D]`` to float32 accuracy: ``x`` split
    into three bfloat16 pieces (``x = hi + mid + lo`` to 2⁻²⁴ relative), each multiplied
    exactly by the 0/1 matrix on the tensor cores with a float32 accumulator. For
    cumulative sums that must keep their small terms (a TF32 matmul would round every
    term to 2⁻¹¹; an IEEE float32 one runs on the FMA units with both operands in
    registers)."""
    ones = mask.astype(jnp.bfloat16)
    total = jnp.zeros(x.shape, F32)
    rest = x
    for _ in range(3):
        piece = rest.astype(jnp.bfloat16)
        total += mm(ones, piece)
        rest = rest - piece.astype(F32)
    return total


def masked_exp(mask: jax.Array, exponent: jax.Array) -> jax.Array:
    """``exp(exponent)`` where ``mask``, 0 elsewhere (masked before the ``exp``)."""
    return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def as_column(row: jax.Array) -> jax.Array:
    """``[1, n]`` → ``[n, 1]``."""
    return jnp.transpose(row)


def f32(x: jax.Array) -> jax.Array:
    return x.astype(F32)


def i32(x: int) -> jax.Array:
    return jnp.int32(x)
