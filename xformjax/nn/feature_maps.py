"""Feature maps φ for linear attention, applied per head to ``[B, T, H, d]``.

- ``identity``: ``φ(x) = x``.
- ``elu+1`` (Katharopoulos et al. 2020): ``φ(x) = elu(x) + 1 > 0``.
- ``relu``: ``φ(x) = max(x, 0)``.
- ``hedgehog`` ("The Hedgehog & the Porcupine", Zhang et al. 2024):
  ``φ(x) = [softmax(x W_h), softmax(−x W_h)]`` (``d → 2d``), ``W_h`` learnable per
  head, initialised to the identity; trained to mimic softmax attention with
  :func:`hedgehog_distillation_loss`.
- ``taylor`` (Based, Arora et al. 2024): the second-order Taylor expansion of
  ``exp(qᵀk/√d)``: ``φ(x) = [1, x/d^{1/4}, vec(x xᵀ)/√(2d)]`` (``d → 1 + d + d²``),
  so ``φ(q)ᵀφ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class FeatureMap(nnx.Module):
    """φ of one kind over ``num_heads`` heads of width ``dim``."""

    def __init__(
        self, kind: str, dim: int, num_heads: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32
    ):
        del rngs
        self.kind, self.dim = kind, dim
        if kind == "hedgehog":
            eye = jnp.broadcast_to(jnp.eye(dim, dtype=param_dtype), (num_heads, dim, dim))
            self.weight = nnx.Param(eye, out_sharding=("heads", None, None), eager_sharding=False)
        elif kind not in ("identity", "elu+1", "relu", "taylor"):
            raise ValueError(f"unknown feature map {kind!r}")

    @property
    def output_dim(self) -> int:
        """Width of ``φ(x)`` per head."""
        return {"hedgehog": 2 * self.dim, "taylor": 1 + self.dim + self.dim**2}.get(
            self.kind, self.dim
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "identity":
            return x
        if self.kind == "elu+1":
            return jax.nn.elu(x) + 1
        if self.kind == "relu":
            return jax.nn.relu(x)
        if self.kind == "hedgehog":  # the softmaxes in float32 (or wider), then x's dtype
            # (not preferred_element_type: XLA:CPU cannot run a batched bf16 × bf16 → f32 dot)
            projected = jnp.einsum("bthd,hde->bthe", x, self.weight[...].astype(x.dtype))
            projected = projected.astype(jnp.promote_types(x.dtype, jnp.float32))
            features = [jax.nn.softmax(projected, -1), jax.nn.softmax(-projected, -1)]
            return jnp.concatenate(features, -1).astype(x.dtype)
        dim = self.dim
        outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], dim * dim)
        ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
        return jnp.concatenate([ones, x * dim**-0.25, outer * (2 * dim) ** -0.5], -1)


def hedgehog_distillation_loss(
    q: jax.Array, k: jax.Array, feature_map: FeatureMap, *, eps: float = 1e-6
) -> jax.Array:
    """Hedgehog's attention-distillation loss for queries/keys ``[B, T, H, d]``.

    The teacher is causal softmax attention ``A_ij = softmax_j(q_iᵀk_j/√d)``, the
    student the normalised linear attention ``Â_ij = φ(q_i)ᵀφ(k_j) / Σ_{l≤i}
    φ(q_i)ᵀφ(k_l)``; the loss is the mean cross-entropy ``−Σ_j A_ij log Â_ij``
    over queries and heads. The teacher is held fixed (no gradient flows into it).
    O(T²): use it on short distillation batches.
    """
    length = q.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    dtype = jnp.promote_types(jnp.result_type(q, k), jnp.float32)  # a loss: float32 or wider
    q, k = q.astype(dtype), k.astype(dtype)
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    teacher = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1))
    scores = jnp.einsum("bihd,bjhd->bhij", feature_map(q), feature_map(k))
    scores = jnp.where(causal, scores, 0.0)
    student = scores / (jnp.sum(scores, -1, keepdims=True) + eps)
    cross_entropy = -jnp.sum(jnp.where(causal, teacher * jnp.log(student + eps), 0.0), -1)
    return jnp.mean(cross_entropy)
