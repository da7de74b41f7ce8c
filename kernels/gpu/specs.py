"""BlockSpecs and launch parameters shared by the GPU kernels.

Every kernel folds batch and heads into one grid axis ``bh`` (``b = bh // H``,
``h = bh % H``) and sees one head's tiles of the token-major arrays through the
specs below. Each takes ``index(*grid_ids)``, which names the blocks of the
head-free axes; the spec adds the batch and head indices:

* ``token_spec``: ``[rows, cols]`` tiles of a ``[B, L, H, D]`` array,
  ``index → (bh, row_block, col_block)``;
* ``row_spec``: ``[rows]`` slices of a ``[B, L, H]`` array (gates, ``β``),
  ``index → (bh, row_block)``;
* ``chunk_state_spec``: tiles of ``[B, N, H, K, V]`` per-chunk states,
  ``index → (bh, chunk, row_block, col_block)``;
* ``state_spec``: ``[rows, cols]`` tiles of a ``[B, H, K, V]`` state,
  ``index → (bh, row_block, col_block)``.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def compiler_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Triton's launch parameters."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def token_spec(rows: int, cols: int, heads: int, index: Callable) -> pl.BlockSpec:
    """``[rows, cols]`` tiles of one head of a ``[B, L, H, D]`` array; ``index(*grid_ids)``
    returns ``(bh, row_block, col_block)``."""

    def index_map(*ids):
        bh, row_block, col_block = index(*ids)
        return bh // heads, row_block, bh % heads, col_block

    return pl.BlockSpec((None, rows, None, cols), index_map)


def row_spec(rows: int, heads: int, index: Callable) -> pl.BlockSpec:
    """``[rows]`` slices of one head of a ``[B, L, H]`` array; ``index(*grid_ids)`` returns
    ``(bh, row_block)``."""

    def index_map(*ids):
        bh, row_block = index(*ids)
        return bh // heads, row_block, bh % heads

    return pl.BlockSpec((None, rows, None), index_map)


def chunk_state_spec(
    chunks: int | None, rows: int, cols: int, heads: int, index: Callable
) -> pl.BlockSpec:
    """Tiles of ``[B, N, H, K, V]`` chunk states: ``chunks=None`` takes one chunk
    ``[rows, cols]``, an int all ``N`` chunks ``[N, rows, cols]``; ``index(*ids)``
    returns ``(bh, chunk, row_block, col_block)``."""

    def index_map(*ids):
        bh, chunk, row_block, col_block = index(*ids)
        return bh // heads, chunk, bh % heads, row_block, col_block

    return pl.BlockSpec((None, chunks, None, rows, cols), index_map)


def state_spec(rows: int, cols: int, heads: int, index: Callable) -> pl.BlockSpec:
    """``[rows, cols]`` tiles of one head of a ``[B, H, K, V]`` state; ``index(*ids)``
    returns ``(bh, row_block, col_block)``."""

    def index_map(*ids):
        bh, row_block, col_block = index(*ids)
        return bh // heads, bh % heads, row_block, col_block

    return pl.BlockSpec((None, None, rows, cols), index_map)
