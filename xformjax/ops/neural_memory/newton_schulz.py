"""Newton–Schulz orthogonalisation, the quintic iteration of the Muon optimiser.

``NS(X)``: ``X ← X / sqrt(‖X‖_F² + ε²)``; then ``steps`` times
``A = X Xᵀ``, ``X ← a X + (b A + c A²) X`` with ``(a, b, c) = (3.4445, −4.7750,
2.0315)``, computed on the wide orientation (transposed when the matrix has more
rows than columns). It pushes the singular values of ``X`` towards 1 (roughly
into [0.7, 1.2]), i.e. approximates ``U Vᵀ`` of ``X = U Σ Vᵀ``. ``ε`` keeps it
smooth at ``X = 0`` (``NS(0) = 0`` with finite gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPSILON = 1e-7


def newton_schulz(x: jax.Array, steps: int) -> jax.Array:
    """``NS(x)`` over the last two axes of ``x`` ``[..., m, n]``."""
    a, b, c = COEFFICIENTS
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = jnp.swapaxes(x, -1, -2)
    norm_sq = jnp.sum(x * x, axis=(-2, -1), keepdims=True)
    x = x * jax.lax.rsqrt(norm_sq + EPSILON**2)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return jnp.swapaxes(x, -1, -2) if transposed else x
