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
Memories and the neural-memory layers (Titans, ATLAS), and by linear attention, RetNet
and GLA with ``config.short_conv`` (:func:`conv_qkv`: their projections are a
:class:`~xformjax.nn.mixer.QKV`, and without the option they have neither the
convolutions nor the SiLU).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.conv import ShortConv
from xformjax.nn.mixer import QKV, split_heads
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
    return projections, short_convs(config, widths, rngs, conv_names)


def short_convs(
    config: MixerConfig,
    widths: Mapping[str, int],
    rngs: nnx.Rngs,
    names: tuple[str, ...] = STREAMS,
) -> nnx.Dict:
    """A :class:`~xformjax.nn.conv.ShortConv` of length ``config.conv_size`` for each
    stream of ``names``, over ``widths[name]`` channels (none when ``conv_size`` is 0)."""
    if not config.conv_size:
        return nnx.Dict({})
    return nnx.Dict(
        {
            name: ShortConv(
                widths[name], config.conv_size, rngs=rngs, param_dtype=config.params_dtype
            )
            for name in names
        }
    )


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
    projections: nnx.Dict | Mapping[str, nnx.Module],
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


def qkv_convs(config: MixerConfig, qkv: QKV, rngs: nnx.Rngs) -> nnx.Dict:
    """The short convolutions of ``config.short_conv`` over ``qkv``'s q, k and v widths
    (none without the option)."""
    if not config.short_conv:
        return nnx.Dict({})
    widths = {name: getattr(qkv, name).out_features for name in STREAMS}
    return short_convs(config, widths, rngs)


def conv_qkv(
    qkv: QKV,
    convs: nnx.Dict,
    x: jax.Array,
    caches: ConvCaches | None,
    packing: Packing | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, ConvCaches]:
    """``q, k, v`` ``[B, T, H, ·]`` of ``qkv``, each through ``SiLU(conv(·))`` when
    ``convs`` has the streams' convolutions (plain projections, and empty caches, when
    it is empty), and the convolutions' new caches."""
    if not convs:
        q, k, v = qkv(x)
        return q, k, v, ConvCaches()
    projections = {"q": qkv.q, "k": qkv.k, "v": qkv.v}
    streams, new_caches = silu_streams(projections, convs, x, caches, packing)
    q, k, v = (split_heads(streams[name], qkv.num_heads) for name in STREAMS)
    return q, k, v, new_caches
