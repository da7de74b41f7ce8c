"""Parameter and FLOP counts of a language model.

FLOPs are estimated analytically per token of a ``seq_len``-token sequence:
``2·(weights of every matrix multiply)`` — projections, MLPs and the output layer —
plus each mixer's sequence-mixing term (:meth:`xformjax.nn.Mixer.sequence_flops`).
Training costs about three forward passes (forward + backward).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from xformjax.models.config import LMConfig
from xformjax.models.lm import LanguageModel


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """What :func:`model_cost` reports."""

    params: int
    embedding_params: int
    forward_flops_per_token: float

    @property
    def train_flops_per_token(self) -> float:
        return 3.0 * self.forward_flops_per_token

    def summary(self) -> str:
        return (
            f"{self.params / 1e6:.2f}M parameters ({self.embedding_params / 1e6:.2f}M "
            f"embedding); {self.forward_flops_per_token / 1e6:.2f} MFLOP/token forward, "
            f"{self.train_flops_per_token / 1e6:.2f} MFLOP/token training"
        )


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _matmul_weights(model: LanguageModel) -> int:
    total = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        stacked = path[0] == "stacks"  # scan_layers: a leading axis of rounds
        if value.ndim == 2 + stacked and path[-1] == "kernel":
            total += int(value.size)
    if model.config.tie_embeddings:
        total += int(model.embedding.size)  # the output layer reuses the embedding
    return total


def model_cost(model_or_config: LanguageModel | LMConfig, seq_len: int) -> ModelCost:
    """Parameters and forward FLOPs per token at ``seq_len`` (builds the model
    abstractly when given a config, so any size is cheap to count)."""
    if isinstance(model_or_config, LMConfig):
        model = nnx.eval_shape(lambda: LanguageModel(model_or_config, rngs=nnx.Rngs(0)))
    else:
        model = model_or_config
    flops = 2.0 * _matmul_weights(model)
    flops += sum(mixer.sequence_flops(seq_len) for mixer in model.mixers())
    return ModelCost(
        params=count_params(model),
        embedding_params=int(model.embedding.size),
        forward_flops_per_token=flops,
    )
