"""Every mixer as a Flax Linen module, through ``nnx.bridge``.

    >>> import jax, jax.numpy as jnp
    >>> from xformjax.nn import MixerConfig, linen as xlinen
    >>> layer = xlinen.mixer("gated_deltanet", MixerConfig(d_model=32, num_heads=2))
    >>> (y, state), variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 8, 32)))
    >>> y.shape
    (1, 8, 32)

:func:`mixer` wraps any mixer name in :data:`xformjax.nn.MIXERS` (it is an
``nnx.bridge.ToLinen`` module). Calls take the NNX module's arguments
(``x, state=..., mode=...``) and return ``(y, state)``. Parameters live in the
``params`` collection; a σReparam'd mixer also keeps its power-iteration vectors
in the ``SpectralVector`` collection: pass ``mutable=["SpectralVector"]`` to
``apply`` while training, or the estimates never advance.
"""

from __future__ import annotations

from flax import linen
from flax.nnx import bridge

from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import get_mixer


def mixer(
    kind: str,
    config: MixerConfig,
    *,
    layer_index: int = 0,
    num_layers: int = 1,
    name: str | None = None,
) -> linen.Module:
    """The mixer registered as ``kind`` wrapped as a Linen module named ``name``."""
    return bridge.to_linen(
        get_mixer(kind), config, layer_index=layer_index, num_layers=num_layers, name=name
    )
