"""The MLP memory ``M_W(x)`` of one head and the gradients of its per-token loss.

``M_W(x) = h_L`` with ``h_0 = x``, ``z_l = h_{l-1} W_l``, ``h_l = SiLU(z_l)`` for
``l < L`` and ``h_L = z_L`` (no activation after the last layer, no biases, no
residual connection). ``W_l`` is ``[d_{l-1}, d_l]`` with ``d_0 = K`` and
``d_L = V``; ``L = 1`` is the linear memory ``M_W(x) = x W``.

The per-token loss is ``ℓ(W; k, v) = ½‖M_W(k) − v‖²``; its gradient is written
out as back-propagation through the MLP (no ``jax.grad``), so the forward pass of
the op is plain matmuls and the op itself stays differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Weights = tuple[jax.Array, ...]


def silu_derivative(z: jax.Array) -> jax.Array:
    """``d SiLU(z) / dz = σ(z) (1 + z (1 − σ(z)))``."""
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


def forward(weights: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """``M_W(x)`` for ``x`` ``[..., K]`` with one set of weights (``W_l`` ``[d, d']``)."""
    h = x
    for index, w in enumerate(weights):
        z = h @ w
        h = jax.nn.silu(z) if index < len(weights) - 1 else z
    return h


def forward_per_token(weights: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """``M_{W_t}(x_t)`` for per-token weights ``W_l`` ``[N, d, d']`` and ``x`` ``[N, K]``."""
    h = x
    for index, w in enumerate(weights):
        z = jnp.einsum("nd,nde->ne", h, w)
        h = jax.nn.silu(z) if index < len(weights) - 1 else z
    return h


def gradient_factors(
    weights: Sequence[jax.Array], k: jax.Array, v: jax.Array, gamma: jax.Array
) -> tuple[Weights, Weights]:
    """The rank-1 factors of ``γ_i ∇_{W_l} ℓ(W; k_i, v_i) = a_{i,l} ⊗ δ_{i,l}``.

    Args:
      weights: ``W_l`` ``[d_{l-1}, d_l]``.
      k: ``[N, K]``; v: ``[N, V]``; gamma: ``[N]`` per-token weights.

    Returns:
      ``(inputs, deltas)``: per layer, the layer's input ``a_l`` ``[N, d_{l-1}]`` and
      the weighted back-propagated error ``δ_l = γ dℓ/dz_l`` ``[N, d_l]``.
    """
    inputs, pre_activations = [], []
    h = k
    for index, w in enumerate(weights):
        inputs.append(h)
        z = h @ w
        pre_activations.append(z)
        h = jax.nn.silu(z) if index < len(weights) - 1 else z
    delta = (h - v) * gamma[:, None]  # dℓ/dz_L, weighted
    deltas: list[jax.Array] = []  # from the last layer down
    for index in reversed(range(len(weights))):
        deltas.append(delta)
        if index > 0:
            delta = (delta @ weights[index].T) * silu_derivative(pre_activations[index - 1])
    return tuple(inputs), tuple(reversed(deltas))


def token_gradients(
    weights: Sequence[jax.Array], k: jax.Array, v: jax.Array, gamma: jax.Array
) -> Weights:
    """``γ_i ∇_W ℓ(W; k_i, v_i)`` for every token ``i``, at one set of weights: one
    ``[N, d_{l-1}, d_l]`` array per layer (arguments as :func:`gradient_factors`)."""
    inputs, deltas = gradient_factors(weights, k, v, gamma)
    return tuple(a[:, :, None] * d[:, None, :] for a, d in zip(inputs, deltas))
