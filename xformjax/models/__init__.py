"""The hybrid language model: configs and presets, the model, generation and costs.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> from xformjax import models
>>> config = models.LMConfig.preset("tiny")
>>> model = models.LanguageModel(config, rngs=nnx.Rngs(0))
>>> logits, cache = model(jnp.zeros((1, 16), jnp.int32))
>>> logits.shape
(1, 16, 256)
>>> models.generate(model, jnp.zeros((1, 4), jnp.int32), max_new_tokens=3,
...                 temperature=0).shape
(1, 3)
"""

from xformjax.models.config import PRESETS, LMConfig
from xformjax.models.flops import ModelCost, count_params, model_cost
from xformjax.models.generate import Generation, complete, generate
from xformjax.models.lm import Block, LanguageModel
from xformjax.models.sampling import SamplingOptions, sample_token

__all__ = [
    "PRESETS",
    "Block",
    "Generation",
    "LMConfig",
    "LanguageModel",
    "ModelCost",
    "SamplingOptions",
    "complete",
    "count_params",
    "generate",
    "model_cost",
    "sample_token",
]
