"""What the TPU (Mosaic) kernels share: blocks, launch parameters, VMEM accounting, matmuls.

Arrays are head-major and padded (``kernels/layout.py``): tokens ``[R, L, D]``
(``R = B·H``, ``L`` a multiple of the chunk ``C``, ``D`` a power of two ≥ 128 lanes),
scalar gates (each part of the compensated pair ``(hi, lo)`` of ``kernels/gates.py``)
and ``β`` ``[R, L, 1]``, per-chunk states ``[R, N, K, V]`` (``N = L/C``)
and states ``[R, K, V]``. Every block's last two dims are multiples of ``(8, 128)``
or the full dims, as Mosaic requires.

A kernel describes each operand once as a :class:`Block` (block shape, dtype, index
map): the same description makes its ``BlockSpec`` and its share of VMEM. Mosaic
double-buffers every pipelined operand, so a kernel needs::

    vmem = 2 · Σ_blocks tile_bytes(block) + Σ_scratch tile_bytes(scratch) + temporaries

with ``tile_bytes`` the bytes of a block padded to whole ``(sublanes, 128)`` tiles
(8 sublanes of 32 bits: 16 rows for bf16) and ``temporaries`` the float32 values
a kernel body keeps live (each kernel states its count). Tests check the result
against each chip's scoped VMEM limit (``xformjax.parallel.tpu.CHIPS``).

Two grids: chunk-parallel kernels ``(R, N)`` with both axes ``"parallel"``; the state
recurrences ``(R, V/BV, N)`` with ``("parallel", "parallel", "arbitrary")`` (the chunk
axis sequential, a float32 ``[K, BV]`` state in a VMEM scratch across it).

Matmuls (:func:`mm`) take their operands in the inputs' dtype (bf16 goes to the MXU
as bf16) and accumulate in float32; float32 operands use ``Precision.HIGHEST``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
LANES = 128

Semantics = tuple[Literal["parallel", "arbitrary"], ...]
#: The chunk-parallel kernels' grid ``(R, N)``.
PARALLEL: Semantics = ("parallel", "parallel")
#: The state recurrences' grid ``(R, V/BV, N)``: the chunk axis sequential.
RECURRENT: Semantics = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The padded sizes one call runs at.

    Attributes:
      chunk_size: tokens per chunk ``C``.
      key_width, value_width: padded ``K`` and ``V`` (powers of two ≥ 128).
      block_v: the state recurrences' value tile ``BV`` (a multiple of 128 dividing ``V``).
    """

    chunk_size: int
    key_width: int
    value_width: int
    block_v: int = LANES

    @property
    def bv(self) -> int:
        return min(self.block_v, self.value_width)


@dataclasses.dataclass(frozen=True)
class Block:
    """One operand of a kernel: ``shape`` its block (``None``: a squeezed axis), ``dtype``,
    ``index`` the index map."""

    shape: tuple[int | None, ...]
    dtype: jnp.dtype
    index: Callable

    @property
    def spec(self) -> pl.BlockSpec:
        return pl.BlockSpec(self.shape, self.index)

    @property
    def bytes(self) -> int:
        return tile_bytes(tuple(d for d in self.shape if d is not None), self.dtype)


def tile_bytes(shape: Sequence[int], dtype) -> int:
    """Bytes of a VMEM buffer of ``shape``: the last dim padded to 128 lanes, the one before
    to whole sublane tiles (8 rows of 32 bits)."""
    itemsize = jnp.dtype(dtype).itemsize
    dims = list(shape)
    if len(dims) >= 1:
        dims[-1] = -(-dims[-1] // LANES) * LANES
    if len(dims) >= 2:
        sublanes = 8 * max(1, 4 // itemsize)
        dims[-2] = -(-dims[-2] // sublanes) * sublanes
    return math.prod(dims) * itemsize


def vmem_bytes(
    blocks: Sequence[Block], scratch: Sequence[tuple[int, ...]] = (), temporaries: int = 0
) -> int:
    """A kernel's VMEM: its pipelined blocks twice, its float32 scratch, its temporaries."""
    return 2 * sum(b.bytes for b in blocks) + sum(tile_bytes(s, F32) for s in scratch) + temporaries


def token(chunk: int, width: int, dtype, index: Callable) -> Block:
    """A ``[C, width]`` tile of an ``[R, L, D]`` array; ``index(*ids) → (r, n, col_block)``."""
    return Block((None, chunk, width), jnp.dtype(dtype), index)


def chunk_state(rows: int, cols: int, dtype, index: Callable) -> Block:
    """A ``[rows, cols]`` tile of an ``[R, N, K, V]`` array; ``index → (r, n, i, j)``."""
    return Block((None, None, rows, cols), jnp.dtype(dtype), index)


def chunk_index(r, n):
    """The block index of a whole-width chunk tile on a ``(rows, chunks)`` grid."""
    return (r, n, 0)


def chunk_blocks(tiles: Tiles, dtype, gate_width: int) -> tuple[Block, Block, Block, Block]:
    """The blocks of a chunk-local kernel on a ``(rows, chunks)`` grid: keys (and
    queries) ``[C, K]``, values ``[C, V]`` in ``dtype``, float32 gates ``[C, gate_width]``
    (1 for a scalar gate, K per channel) and the chunk's entering state ``[K, V]``."""
    c, kw, vw = tiles.chunk_size, tiles.key_width, tiles.value_width
    return (
        token(c, kw, dtype, chunk_index),
        token(c, vw, dtype, chunk_index),
        token(c, gate_width, F32, chunk_index),
        chunk_state(kw, vw, dtype, lambda r, n: (r, n, 0, 0)),
    )


def state(rows: int, cols: int, index: Callable) -> Block:
    """A float32 ``[rows, cols]`` tile of an ``[R, K, V]`` state; ``index → (r, i, j)``."""
    return Block((None, rows, cols), jnp.dtype(F32), index)


def call(
    kernel: Callable,
    inputs: Sequence[tuple[jax.Array, Block]],
    outputs: Sequence[tuple[tuple[int, ...], Block]],
    *,
    grid: tuple[int, ...],
    semantics: Semantics,
    scratch: Sequence[tuple[int, ...]] = (),
    interpret: bool,
    name: str,
) -> list[jax.Array]:
    """``pallas_call`` of ``kernel`` over ``grid`` with ``inputs`` (array, block) and
    ``outputs`` (shape, block), float32 VMEM ``scratch`` shapes and the grid's
    dimension ``semantics``; ``interpret`` runs the TPU interpreter."""
    results = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(shape, b.dtype) for shape, b in outputs],
        grid=grid,
        in_specs=[b.spec for _, b in inputs],
        out_specs=[b.spec for _, b in outputs],
        scratch_shapes=[pltpu.VMEM(s, F32) for s in scratch],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )(*(x for x, _ in inputs))
    return list(results)


def mm(a: jax.Array, b: jax.Array, dtype, *, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` with both operands cast to ``dtype`` and float32 accumulation."""
    dtype = jnp.dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype.itemsize >= 4 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
        precision=precision,
        preferred_element_type=F32,
    )


def gap(hi_i: jax.Array, lo_i: jax.Array, hi_j: jax.Array, lo_j: jax.Array) -> jax.Array:
    """``b_i − b_j`` of compensated pairs ``b = hi + lo`` (``kernels/gates.py``):
    ``hi_i − hi_j`` is exact when ``hi_i ≈ hi_j``, so a strong gate before both costs no
    precision."""
    return (hi_i - hi_j) + (lo_i - lo_j)


def decay(
    b: jax.Array, lo: jax.Array, *, strict: bool = False, transposed: bool = False
) -> jax.Array:
    """``Γ_ij = e^{b_i − b_j} [j ≤ i]`` (``j < i`` when ``strict``; ``Γᵀ`` when
    ``transposed``) ``[C, C]`` float32 for a scalar gate given as its compensated pair
    ``b, lo [C, 1]`` (:func:`gap`; masked before the ``exp``)."""
    size = b.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    eye = rows == cols
    b_row = jnp.sum(jnp.where(eye, b, 0.0), axis=0, keepdims=True)  # [1, C]
    lo_row = jnp.sum(jnp.where(eye, lo, 0.0), axis=0, keepdims=True)
    if transposed:  # [j, i] = e^{b_i − b_j}, i ≥ j
        mask = cols > rows if strict else cols >= rows
        return jnp.exp(jnp.where(mask, gap(b_row, lo_row, b, lo), -jnp.inf))
    mask = rows > cols if strict else rows >= cols
    return jnp.exp(jnp.where(mask, gap(b, lo, b_row, lo_row), -jnp.inf))


def last_row(x: jax.Array) -> jax.Array:
    """``[C, D]`` → its last row ``[1, D]`` (a masked sum: no dynamic index)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == x.shape[0] - 1, x, 0.0), axis=0, keepdims=True)


def row_to_column(row: jax.Array) -> jax.Array:
    """``[1, n]`` → ``[n, 1]`` through an identity mask."""
    size = row.shape[1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0) == jax.lax.broadcasted_iota(
        jnp.int32, (size, size), 1
    )
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)
