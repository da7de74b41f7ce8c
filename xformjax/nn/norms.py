"""Normalisations over the last axis, computed in ``promote(dtype, float32)``.

- ``RMSNorm``:  ``y = γ ⊙ x / sqrt(mean(x²) + ε)``.
- ``LayerNorm``: ``y = γ ⊙ (x − mean x) / sqrt(var x + ε) + b``.
- ``SRMSNorm`` (TransNormerLLM's "simple" RMSNorm): ``y = x / sqrt(mean(x²) + ε)``,
  no parameters.
- ``CRMSNorm`` ("Pre-RMSNorm and Pre-CRMSNorm Transformers", Jiang et al. 2023):
  for a zero-mean vector ``x ∈ R^d`` stored compressed as its first ``d − 1``
  coordinates ``x̂`` (the last is ``−Σ x̂``),
  ``y = γ ⊙ x̂ / sqrt((‖x̂‖² + (Σ x̂)²) / d + ε)`` — RMSNorm of the full vector,
  computed on ``d − 1`` numbers.
- ``l2_normalize``: ``y = x / sqrt(‖x‖² + ε)``, no parameters (the per-head q, k
  normalisation of the delta-rule and neural-memory layers).

The paper's equivalence — a Pre-LN Transformer equals a Pre-RMSNorm one when the
main branch is kept zero-mean, which equals a Pre-CRMSNorm one on the compressed
``d − 1`` dimensions — is checked in ``tests/nn/test_norms.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("rms", "layer", "srms")


def float_rows(x: jax.Array) -> jax.Array:
    """``x`` as ``[N, D]`` rows (all leading axes flattened) in ``promote(dtype, float32)``.

    The norms work on rows: with a leading axis of 1 (batch 1), XLA:CPU (jaxlib 0.10)
    hands the backward's sums over tokens to YNNPACK as reduces that keep that axis,
    which ran 25× slower (16 ms instead of 0.6 ms for RMSNorm on ``[1, 4096, 256]``).
    Under a multi-device mesh the leading axes are kept (see the comment below).
    """
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        # under a mesh B and T are split over different axes (batch, seq): one merged
        # row axis cannot keep both splits, and XLA would all-gather the sequence
        return xf
    return xf.reshape(-1, x.shape[-1])


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / ‖x‖`` over the last axis, in ``promote(dtype, float32)``."""
    xf = float_rows(x)
    y = xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)
    return y.astype(x.dtype).reshape(x.shape)


class _ScaledNorm(nnx.Module):
    """A norm with a learnable per-feature scale ``γ`` (initialised to ones)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        rngs: nnx.Rngs | None = None,
        param_dtype=jnp.float32,
        axis_name: str | None = "embed",
    ):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False
        )


class RMSNorm(_ScaledNorm):
    """``γ ⊙ x / rms(x)`` over the last axis (``dim`` features)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = float_rows(x)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype).reshape(x.shape)


class SRMSNorm(nnx.Module):
    """``x / rms(x)`` over the last axis, without parameters."""

    def __init__(
        self, dim: int | None = None, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None, **_
    ):
        del dim, rngs
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = float_rows(x)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype).reshape(x.shape)


class LayerNorm(_ScaledNorm):
    """``γ ⊙ (x − μ)/σ + b`` over the last axis."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        rngs: nnx.Rngs | None = None,
        param_dtype=jnp.float32,
        axis_name: str | None = "embed",
    ):
        super().__init__(dim, eps=eps, param_dtype=param_dtype, axis_name=axis_name)
        self.bias = nnx.Param(
            jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = float_rows(x)
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype).reshape(x.shape)


class CRMSNorm(_ScaledNorm):
    """RMSNorm of a zero-mean ``(dim + 1)``-vector given by its first ``dim`` entries."""

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = float_rows(x)
        full_dim = x.shape[-1] + 1
        square_sum = jnp.sum(xf * xf, axis=-1, keepdims=True) + jnp.square(
            jnp.sum(xf, axis=-1, keepdims=True)
        )
        y = xf * jax.lax.rsqrt(square_sum / full_dim + self.eps)
        return (y * self.scale[...]).astype(x.dtype).reshape(x.shape)


def make_norm(
    kind: str,
    dim: int,
    *,
    eps: float = 1e-6,
    param_dtype=jnp.float32,
    axis_name: str | None = "embed",
) -> nnx.Module:
    """``"rms"`` → :class:`RMSNorm`, ``"layer"`` → :class:`LayerNorm`,
    ``"srms"`` → :class:`SRMSNorm`."""
    if kind == "rms":
        return RMSNorm(dim, eps=eps, param_dtype=param_dtype, axis_name=axis_name)
    if kind == "layer":
        return LayerNorm(dim, eps=eps, param_dtype=param_dtype, axis_name=axis_name)
    if kind == "srms":
        return SRMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")
