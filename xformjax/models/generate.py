"""Autoregressive generation with the mixers' recurrent states as the cache.

The prompt is run once (prefill) into a cache allocated for ``prompt +
max_new_tokens`` tokens; every new token is then one step of each layer's
recurrence: the linear and delta-rule families carry a constant-size memory, the
softmax layers a KV cache. The decoding loop is a jitted ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax import config as library_config
from xformjax.models.lm import LanguageModel


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None
) -> jax.Array:
    """Sample from ``logits`` ``[B, V]``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: LanguageModel,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    return_logits: bool = False,
):
    """Continue ``prompt_tokens`` int ``[B, P]`` by ``max_new_tokens`` tokens.

    Args:
      model: a :class:`LanguageModel`; decoding runs a copy in eval mode (σReparam
        estimates fixed), the model itself is not changed.
      prompt_tokens: ``[B, P]`` with ``P ≥ 1``.
      max_new_tokens: tokens to generate (≥ 1).
      temperature: softmax temperature; ``0`` decodes greedily.
      top_k: sample only among the ``top_k`` most likely tokens.
      seed: PRNG seed of the sampler.
      return_logits: also return the logits each new token was drawn from.

    Returns:
      ``[B, max_new_tokens]`` int32 tokens, and with ``return_logits`` the
      ``[B, max_new_tokens, vocab]`` logits as well.
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(
            f"generate: `prompt_tokens` must be [B, P] with P ≥ 1; got shape "
            f"{tuple(prompt_tokens.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate: `max_new_tokens` must be ≥ 1; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: `temperature` must be ≥ 0; got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"generate: `top_k` must lie in [1, vocab_size]; got {top_k}")
    batch, prompt_len = prompt_tokens.shape
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, prompt, key):
        module = nnx.merge(graphdef, params)
        module.eval()  # a copy: σReparam estimates stay fixed while decoding
        cache = module.init_cache(batch, prompt_len + max_new_tokens)
        logits, cache = module(prompt.astype(jnp.int32), cache)
        key, step_key = jax.random.split(key)
        first_logits = logits[:, -1]
        first = sample_token(first_logits, step_key, temperature, top_k)

        def step(carry, _):
            token, cache, key = carry
            logits, cache = module(token[:, None], cache)
            key, step_key = jax.random.split(key)
            next_token = sample_token(logits[:, -1], step_key, temperature, top_k)
            return (next_token, cache, key), (next_token, logits[:, -1])

        (_, _, _), (tokens, step_logits) = jax.lax.scan(
            step, (first, cache, key), None, length=max_new_tokens - 1
        )
        tokens = jnp.concatenate([first[:, None], jnp.moveaxis(tokens, 0, 1)], axis=1)
        all_logits = jnp.concatenate(
            [first_logits[:, None], jnp.moveaxis(step_logits, 0, 1)], axis=1
        )
        return tokens, all_logits

    decode = library_config.checked_if_on(run)
    tokens, logits = decode(params, prompt_tokens, jax.random.key(seed))
    return (tokens, logits) if return_logits else tokens
