"""Flax NNX sequence mixers, norms and blocks.

Every mixer is built from a :class:`MixerConfig` and called as
``y, state = mixer(x, state=None, mode=None)``; the registry :data:`MIXERS` maps
short names to classes::

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from xformjax import nn
    >>> layer = nn.MIXERS["gated_deltanet"](nn.MixerConfig(d_model=32, num_heads=2),
    ...                                     rngs=nnx.Rngs(0))
    >>> y, state = layer(jnp.ones((1, 8, 32)))
    >>> y.shape, state.memory.shape
    ((1, 8, 32), (1, 2, 16, 16))

A state is a typed pytree (:mod:`xformjax.nn.states`), one class per kind of layer.
"""

# importing each family's module registers its mixers in MIXERS
from xformjax.nn.aaren import Aaren
from xformjax.nn.atlas import Atlas
from xformjax.nn.attention import Attention, SigmoidAttention
from xformjax.nn.config import MixerConfig
from xformjax.nn.conv import ShortConv
from xformjax.nn.deltanet import DeltaNet, DeltaProduct, GatedDeltaNet
from xformjax.nn.diagonal import DiagonalRNN
from xformjax.nn.feature_maps import FeatureMap, hedgehog_distillation_loss
from xformjax.nn.gla import GatedLinearAttention
from xformjax.nn.lightnet import LightNet
from xformjax.nn.lightning import LightningAttention
from xformjax.nn.linear import Dense
from xformjax.nn.linear_attention import LinearAttention, hedgehog_loss
from xformjax.nn.mixer import MIXERS, Mixer, get_mixer, register
from xformjax.nn.mom import MixtureOfMemories, load_balance_loss
from xformjax.nn.neural_memory import NeuralMemoryMixer
from xformjax.nn.norms import CRMSNorm, LayerNorm, RMSNorm, SRMSNorm, make_norm
from xformjax.nn.retnet import RetNet
from xformjax.nn.states import MixerState
from xformjax.nn.titans import Titans, TitansMAC, TitansMAG, TitansMAL
from xformjax.nn.transnormer import TransNormer

__all__ = [
    "MIXERS",
    "Aaren",
    "Atlas",
    "Attention",
    "CRMSNorm",
    "DeltaNet",
    "DeltaProduct",
    "Dense",
    "DiagonalRNN",
    "FeatureMap",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "LayerNorm",
    "LightNet",
    "LightningAttention",
    "LinearAttention",
    "Mixer",
    "MixerConfig",
    "MixerState",
    "MixtureOfMemories",
    "NeuralMemoryMixer",
    "RMSNorm",
    "RetNet",
    "SRMSNorm",
    "ShortConv",
    "SigmoidAttention",
    "Titans",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "TransNormer",
    "get_mixer",
    "hedgehog_distillation_loss",
    "hedgehog_loss",
    "load_balance_loss",
    "make_norm",
    "register",
]
