"""Projections with logical sharding names, optionally σReparam'd.

``Dense`` is ``y = x W (+ b)`` with ``W`` ``[in, out]`` carrying the logical axis
names given as ``axes`` (``nnx.with_partitioning``; e.g. ``("embed", "heads")``),
so a mesh's logical-axis rules can place it.

σReparam ("Stabilizing Transformer Training by Preventing Attention Entropy
Collapse", Zhai et al. 2023) uses ``Ŵ = γ / σ(W) · W`` with ``σ(W)`` the spectral
norm, estimated by one power-iteration step per training call (the singular
vector estimate ``u`` is a non-trainable ``SpectralVector`` variable, updated in
place while the module is not ``deterministic``; ``model.eval()`` freezes it so
decoding and a full forward use the same ``σ``). ``γ`` is learnable and
initialised to ``σ(W₀)``, so at initialisation ``Ŵ = W₀``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn.config import MixerConfig


class SpectralVector(nnx.Variable):
    """Power-iteration estimate of the leading right singular vector of a kernel."""


def partitioned(initializer, axes: Sequence[str | None]):
    """``initializer`` whose parameter carries logical axis names ``axes``."""
    return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)


def _normalize(x: jax.Array) -> jax.Array:
    return x / (jnp.linalg.norm(x) + 1e-12)


class Dense(nnx.Module):
    """``y = x W + b`` over the last axis of ``x``; ``W`` is ``[in, out]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Sequence[str | None],
        rngs: nnx.Rngs,
        use_bias: bool = False,
        sigma_reparam: bool = False,
        init_scale: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        bias_init: float = 0.0,
        out_dtype=None,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        # the result dtype: ``dtype`` if None; float32 gives bfloat16 operands with a
        # float32 result (``preferred_element_type``), for outputs that feed float32 math
        self.out_dtype = dtype if out_dtype is None else out_dtype
        self.sigma_reparam = sigma_reparam
        self.deterministic = False
        base = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")
        kernel = base(rngs.params(), (in_features, out_features), param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=tuple(axes), eager_sharding=False)
        self.bias = (
            nnx.Param(
                jnp.full((out_features,), bias_init, param_dtype),
                out_sharding=(axes[-1],),
                eager_sharding=False,
            )
            if use_bias
            else None
        )
        if sigma_reparam:
            u = _normalize(jax.random.normal(rngs.params(), (out_features,), param_dtype))
            for _ in range(20):  # start from a converged estimate
                u = _normalize(kernel.T @ _normalize(kernel @ u))
            self.u = SpectralVector(u)
            self.gamma = nnx.Param(
                jnp.linalg.norm(kernel, 2).astype(param_dtype),
                out_sharding=(),
                eager_sharding=False,
            )

    def effective_kernel(self) -> jax.Array:
        """``W``, or ``γ/σ(W)·W`` under σReparam (updating ``u`` when training)."""
        kernel = self.kernel[...]
        if not self.sigma_reparam:
            return kernel
        u = self.u[...]
        if not self.deterministic:
            u = jax.lax.stop_gradient(_normalize(kernel.T @ _normalize(kernel @ u)))
            self.u[...] = u
        v = jax.lax.stop_gradient(_normalize(kernel @ u))
        sigma = v @ kernel @ u
        return kernel * (self.gamma[...] / sigma)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.effective_kernel().astype(self.dtype)
        y = jnp.einsum(
            "...i,io->...o", x.astype(self.dtype), kernel, preferred_element_type=self.out_dtype
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        return y


def dense(
    config: MixerConfig,
    in_features: int,
    out_features: int,
    *,
    axes: Sequence[str | None],
    rngs: nnx.Rngs,
    float_output: bool = False,
    **kwargs,
) -> Dense:
    """A :class:`Dense` with the config's dtypes and σReparam setting.

    ``float_output``: return ``promote(compute dtype, float32)`` — the operands stay in
    the compute dtype, the matmul accumulates and returns float32 (the projections
    whose outputs feed float32 gate math: decays, step sizes, log-sigmoids)."""
    out_dtype = jnp.promote_types(config.compute_dtype, jnp.float32) if float_output else None
    return Dense(
        in_features,
        out_features,
        axes=axes,
        rngs=rngs,
        sigma_reparam=config.sigma_reparam,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        out_dtype=out_dtype,
        **kwargs,
    )
