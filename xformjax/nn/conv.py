"""Short causal depthwise convolution with a decoding cache.

``y_t = Σ_{j<L} w_j ⊙ x_{t−L+1+j}`` per channel (``w`` ``[L, C]``), zero history
before the first token. The cache is the last ``L − 1`` inputs ``[B, L−1, C]``,
so feeding tokens one at a time with the cache equals the full convolution.

With a :class:`~xformjax.nn.packing.Packing` (documents packed in a row) an input of an
earlier document counts as zero: the convolution never reads across a boundary.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn.packing import Packing


class ShortConv(nnx.Module):
    """Depthwise causal conv of length ``kernel_size`` over ``channels``."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        axis_name: str | None = "heads",
    ):
        self.kernel_size = kernel_size
        bound = kernel_size**-0.5
        weight = jax.random.uniform(
            rngs.params(), (kernel_size, channels), param_dtype, -bound, bound
        )
        self.weight = nnx.Param(weight, out_sharding=(None, axis_name), eager_sharding=False)

    def init_cache(self, batch: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((batch, self.kernel_size - 1, self.weight.shape[1]), dtype)

    def __call__(
        self, x: jax.Array, cache: jax.Array | None = None, packing: Packing | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``x`` ``[B, T, C]`` → ``(y [B, T, C], cache [B, L−1, C])``; ``packing``:
        documents packed in the rows (none read another's inputs)."""
        batch, length, _ = x.shape
        if cache is None:
            cache = self.init_cache(batch, x.dtype)
        padded = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        weight = self.weight[...].astype(x.dtype)
        channels = weight.shape[1]
        # Tokens flattened to [B·T, C]: the weight's gradient is then a sum over one
        # leading axis. Kept as [1, T, C] (B = 1), XLA:CPU (jaxlib 0.10) hands that sum to
        # YNNPACK as a reduce to [1, C], which ran 100× slower (13 ms at T = 4096).
        windows = [padded[:, j : j + length] for j in range(self.kernel_size)]
        new_cache = padded[:, length:]
        if packing is not None:
            # the cache's tokens belong to the document the call continues (index 0)
            history = jnp.zeros((batch, self.kernel_size - 1), jnp.int32)
            documents = jnp.concatenate([history, packing.document_index], axis=1)
            here = packing.document_index[..., None]
            windows = [
                jnp.where(documents[:, j : j + length, None] == here, window, 0)
                for j, window in enumerate(windows)
            ]
            # the next call continues the row's last document: forget earlier ones
            last = documents[:, length:, None] == packing.document_index[:, -1:, None]
            new_cache = jnp.where(last, new_cache, 0)
        windows = [window.reshape(batch * length, channels) for window in windows]
        y = cast(jax.Array, sum(weight[j] * window for j, window in enumerate(windows)))
        return y.reshape(batch, length, channels), new_cache
