"""``(I + A)⁻¹`` for the strictly lower-triangular ``A`` of the WY/UT transform, and its VJP.

The chunked delta rule (``chunk.py``) needs ``T = (I + A)⁻¹`` for every chunk,
``A = tril(diag(β)(K Kᵀ ⊙ Γ), −1)`` ``[.., C, C]``. Forward: substitution inside
16×16 diagonal blocks, then pairs of blocks merged by ``T₂₁ = −T₂₂ A₂₁ T₁₁``
(matmuls, log₂ depth). Backward: ``dA = −tril(Tᵀ dT Tᵀ, −1)``, matmuls only.
(Differentiating ``jax.scipy.linalg.solve_triangular`` deadlocks XLA:CPU on
jaxlib 0.10.2.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xformjax.ops.common.channel_scores import SUB_CHUNK, diagonal_blocks


def _substitution_inverse(a: jax.Array) -> jax.Array:
    """``(I + A)⁻¹`` for small strictly lower-triangular ``A``, row by row:
    ``t_i = e_i − Σ_{j<i} A_ij t_j``."""
    size = a.shape[-1]

    def row(t, i):
        t_i = jnp.eye(size, dtype=a.dtype)[i] - jnp.einsum("...j,...jd->...d", a[..., i, :], t)
        return t.at[..., i, :].set(t_i), None

    inverse, _ = jax.lax.scan(row, jnp.zeros_like(a), jnp.arange(size))
    return inverse


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``T = (I + A)⁻¹`` for strictly lower-triangular ``A`` ``[.., C, C]`` (see the module)."""
    size = a.shape[-1]
    block = math.gcd(size, SUB_CHUNK)
    padded = block * 2 ** math.ceil(math.log2(size // block))
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, padded - size)] * 2)
    inverse = _substitution_inverse(diagonal_blocks(a, block))  # [.., n, s, s]
    while inverse.shape[-3] > 1:
        pairs = inverse.reshape(inverse.shape[:-3] + (-1, 2) + inverse.shape[-2:])
        first, second = pairs[..., 0, :, :], pairs[..., 1, :, :]
        width = 2 * inverse.shape[-1]
        below = diagonal_blocks(a, width)[..., width // 2 :, : width // 2]
        lower = -jnp.einsum("...ij,...jk,...kl->...il", second, below, first)
        top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
        bottom = jnp.concatenate([lower, second], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
    return inverse[..., 0, :size, :size]


def _unit_lower_inverse_fwd(a):
    inverse = unit_lower_inverse(a)
    return inverse, inverse


def _unit_lower_inverse_bwd(inverse, d_inverse):
    size = inverse.shape[-1]
    d_a = -jnp.einsum("...ji,...jk,...lk->...il", inverse, d_inverse, inverse)
    return (jnp.where(jnp.tril(jnp.ones((size, size), bool), -1), d_a, 0.0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)
