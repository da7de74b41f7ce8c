"""AdamW with linear warm-up and cosine decay, behind global-norm clipping."""

from __future__ import annotations

import optax

from xformjax.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """0 → ``learning_rate`` over ``warmup_steps``, then a cosine to
    ``learning_rate · min_lr_ratio`` at ``steps``."""
    warmup = min(config.warmup_steps, config.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=config.steps, end_value=config.learning_rate * config.min_lr_ratio)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping (if ``grad_clip > 0``) then AdamW on the schedule."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.95,
                        weight_decay=config.weight_decay)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
