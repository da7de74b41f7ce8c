"""Training: configs, the trainer loop, checkpoints and the ``xformjax`` CLI.

>>> from xformjax.train import load_config
>>> config = load_config("tiny", ["train.steps=5", "model.layer_pattern=attn"])
>>> config.train.steps, config.model.layer_names()
(5, ('attn', 'attn'))
"""

from xformjax.extras import require_extra

require_extra("train", "xformjax.train")  # before the imports that need it

# ruff: noqa: E402 (the imports below need the extra checked above)
from xformjax.train.checkpoint import Checkpointer
from xformjax.train.config import (
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from xformjax.train.trainer import NonFiniteLossError, Trainer, loss_and_metrics

__all__ = [
    "Checkpointer",
    "DataConfig",
    "ExperimentConfig",
    "MeshConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "load_config",
    "loss_and_metrics",
]
