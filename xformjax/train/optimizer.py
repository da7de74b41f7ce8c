"""AdamW with linear warm-up and cosine decay, behind global-norm clipping.

Weight decay applies to the matrices only: the kernels of the projections, the
MLPs and the memories (every parameter with two or more axes) except the token
embedding. Norm gains, biases, per-channel gates and the embedding are not
decayed, as in GPT-2/nanoGPT-style and Gemma training: decaying a norm's gain pulls
it towards zero, and decaying the embedding shrinks the token signal that the
residual stream starts from.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from xformjax.train.config import TrainConfig

#: parameters never decayed, by name (the language model's token embedding)
NOT_DECAYED = frozenset({"embedding"})


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """0 → ``learning_rate`` over ``warmup_steps``, then a cosine to
    ``learning_rate · min_lr_ratio`` at ``steps``."""
    warmup = min(config.warmup_steps, config.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def _path_names(path) -> list[str]:
    return [
        str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path
    ]


def weight_decay_mask(params: Any) -> Any:
    """``True`` for the leaves of ``params`` that weight decay applies to: arrays
    with two or more axes whose path names no :data:`NOT_DECAYED` parameter."""

    def decayed(path, leaf) -> bool:
        return getattr(leaf, "ndim", 0) >= 2 and not NOT_DECAYED & set(_path_names(path))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping (if ``grad_clip > 0``) then AdamW on the schedule, decaying the
    matrices only (:func:`weight_decay_mask`)."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=0.9,
        b2=0.95,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
