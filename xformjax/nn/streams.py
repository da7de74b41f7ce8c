"""The q, k, v input streams of the recurrent layers: projections, short causal
convolutions and SiLU.

For each stream ``s`` of ``q, k, v``:

    s_t = SiLU(conv(x W_s)_t)        (conv: :class:`~xformjax.nn.conv.ShortConv`, when
                                      ``config.conv_size > 0``; identity otherwise)

``q`` has ``H · K`` features; ``k`` and ``v`` ``copies · H · K`` and ``copies · H · V``
(DeltaProduct's sub-steps, Mixture-of-Memories' memories). The streams stay flat
``[B, T, width]``: splitting them into heads is the layer's job. The convolutions'
decoding caches travel in the layer's state as a
:class:`~xformjax.nn.states.ConvCaches`. Used by the delta-rule layers, Mixture-of-
Memories and the neural-memory layers (Titans, ATLAS).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.conv import ShortConv
from xformjax.nn.packing import Packing
from xformjax.nn.states import ConvCaches

STREAMS: tuple[str, ...] = ("q", "k", "v")


def stream_layers(
    config: MixerConfig, copies: int, rngs: nnx.Rngs, conv_names: tuple[str, ...] = STREAMS
) -> tuple[nnx.Dict, nnx.Dict]:
    """The q (one per head) and k, v (``copies`` per head: DeltaProduct's steps, MoM's
    memories) projections, and the short causal convolutions of ``conv_names``
    (none without ``config.conv_size``)."""
    heads, d = config.num_heads, config.d_model
    widths = {
        "q": heads * config.key_dim,
        "k": copies * heads * config.key_dim,
        "v": copies * heads * config.value_dim,
    }
    projections = nnx.Dict(
        {
            name: linear.dense(config, d, widths[name], axes=("embed", "heads"), rngs=rngs)
            for name in STREAMS
        }
    )
    convs = nnx.Dict(
        {
            name: ShortConv(
                widths[name], config.conv_size, rngs=rngs, param_dtype=config.params_dtype
            )
            for name in conv_names
        }
        if config.conv_size
        else {}
    )
    return projections, convs


def init_conv_caches(convs: nnx.Dict, batch: int, dtype) -> ConvCaches:
    """Empty caches (zero history) of the convolutions in ``convs``."""
    return ConvCaches(**{name: conv.init_cache(batch, dtype) for name, conv in convs.items()})


def silu_stream(
    projection: nnx.Module,
    conv: ShortConv | None,
    x: jax.Array,
    cache: jax.Array | None,
    packing: Packing | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """``SiLU(conv(x W))`` ``[B, T, width]`` and the convolution's new cache (``None``
    without a convolution); ``packing``: documents packed in the rows."""
    y = projection(x)
    if conv is not None:
        y, cache = conv(y, cache, packing)
    else:
        cache = None
    return jax.nn.silu(y), cache


def silu_streams(
    projections: nnx.Dict,
    convs: nnx.Dict | Mapping[str, ShortConv],
    x: jax.Array,
    caches: ConvCaches | None,
    packing: Packing | None = None,
) -> tuple[dict[str, jax.Array], ConvCaches]:
    """``SiLU(conv(x W))`` for q, k, v (flat widths) and the convolutions' new caches
    (``caches`` ``None``: a fresh sequence; ``packing``: documents packed in the rows)."""
    streams, new_caches = {}, {}
    for name in STREAMS:
        cache = None if caches is None else getattr(caches, name)
        streams[name], new_caches[name] = silu_stream(
            projections[name], convs.get(name), x, cache, packing
        )
    return streams, ConvCaches(**new_caches)
