"""In-kernel helpers of the TPU (Mosaic) kernels, written on values (no refs).

Masks and row/column moves on 2-D tiles, float32 matmuls and the unit
lower-triangular inverse ``(I + A)⁻¹`` the delta rule's WY/UT transform needs
(``kernels/tpu/chunk.py``), and the single-row helpers of GLA's exact diagonal
blocks (``kernels/tpu/gla.py``). Shapes are per chunk of one (batch, head):
``C`` tokens by a feature width.

Only ``lax`` primitives that Mosaic TPU (and Triton) lower are used: 2-D
``dot_general``, elementwise ops, ``broadcasted_iota`` masks and reductions
along one axis, all on 2-D arrays; integer index arithmetic by shifts and
masks. Rows and columns are moved with identity-matrix masks rather than
transposes or slices.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul in float32 (operands of another dtype are multiplied exactly)."""
    return lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        preferred_element_type=F32,
        precision=lax.Precision.HIGHEST,
    )


def mm(a, b):
    """``a @ b``."""
    return _dot(a, b, 1, 0)


def lower_mask(size: int, strict: bool = False):
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    return rows > cols if strict else rows >= cols


def column_to_row(col):
    """``[n, 1]`` → ``[1, n]`` through an identity mask."""
    size = col.shape[0]
    eye = _iota((size, size), 0) == _iota((size, size), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def on_last_row(shape, row):
    """A ``[C, D]`` array holding ``row`` ``[1, D]`` on its last row, zeros elsewhere."""
    return jnp.where(_iota(shape, 0) == shape[0] - 1, row, 0.0)


def rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def total(x):
    """Sum of a 2-D array as ``[1, 1]`` (lanes first, then sublanes)."""
    return jnp.sum(rowsum(x), axis=0, keepdims=True)


def column(x, j: int):
    """Column ``j`` of ``x [R, C]`` as ``[R, 1]``."""
    return rowsum(jnp.where(_iota(x.shape, 1) == j, x, 0.0))


def row(x, i: int):
    """Row ``i`` of ``x [R, C]`` as ``[1, C]``."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def unit_lower_inverse(a, block: int):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A`` ``[C, C]``, by matmuls only.

    Inside ``block``×``block`` diagonal blocks, forward substitution: at step
    ``s`` every block's row ``s`` becomes ``e_i − Σ_{j<i} A_ij t_j`` at once
    (one matmul; the rows it reads are final). Then, with ``T_d`` that
    block-diagonal inverse and ``N = T_d A_off`` (strictly block-lower, so
    ``N^{C/block} = 0``): ``(I + A)⁻¹ = (I − N + N² − …) T_d``.
    """
    size = a.shape[0]
    block = min(block, size)
    if block & (block - 1):
        raise ValueError(f"inverse block must be a power of two; got {block}")
    shift = jnp.int32(block.bit_length() - 1)  # int32 under jax_enable_x64 too
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(F32)
    # Integer division and remainder by shifts and masks: Mosaic has no vector divide.
    same_block = lax.shift_right_logical(rows, shift) == lax.shift_right_logical(cols, shift)
    a_diag = jnp.where(same_block, a, 0.0)
    a_off = a - a_diag
    inverse = eye
    for step in range(1, block):
        on_step = (rows & jnp.int32(block - 1)) == jnp.int32(step)
        inverse = jnp.where(on_step, eye - mm(a_diag, inverse), inverse)
    num_blocks = -(-size // block)
    if num_blocks > 1:
        nilpotent = mm(inverse, a_off)
        series = eye
        for _ in range(num_blocks - 1):
            series = eye - mm(nilpotent, series)
        inverse = mm(series, inverse)
    return inverse
