"""The hybrid language model: configs, training on a copy task, and costs (generation:
``test_generate.py``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import models, nn


def tiny(**overrides) -> models.LMConfig:
    return models.LMConfig.preset(
        "tiny", **{"mixer.d_model": 32, "mixer.chunk_size": 16, **overrides}
    )


@pytest.mark.optimized
def test_a_few_hundred_steps_learn_a_copy_task():
    """Copy 12 random symbols after a separator: chance is log 16 ≈ 2.77 nats."""
    length, symbols = 12, 16
    model = models.LanguageModel(tiny(vocab_size=symbols + 1), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    def batch(key):
        x = jax.random.randint(key, (32, length), 0, symbols)
        return jnp.concatenate([x, jnp.full((32, 1), symbols), x], 1)

    @nnx.jit
    def step(model, optimizer, sequence):
        def loss_fn(model):
            logits, _ = model(sequence[:, :-1])
            log_probs = jax.nn.log_softmax(logits[:, length:], -1)
            targets = sequence[:, length + 1 :]
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(0)
    losses = []
    for _ in range(250):
        key, sub = jax.random.split(key)
        losses.append(float(step(model, optimizer, batch(sub))))
    chance = np.log(symbols)
    assert losses[0] > 0.8 * chance
    assert np.mean(losses[-10:]) < 0.05 * chance, losses[-10:]


def test_presets_overrides_and_layer_pattern():
    config = models.LMConfig.preset("small", num_layers=7, **{"mixer.num_heads": 8})
    assert config.mixer.num_heads == 8 and config.num_layers == 7
    assert config.layer_names() == ("gated_deltanet", "gated_deltanet", "attn") * 2 + (
        "gated_deltanet",
    )
    assert models.LMConfig(layer_pattern="gdn, attn", num_layers=2).layer_names() == (
        "gated_deltanet",
        "attn",
    )
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        models.LMConfig.preset("huge")
    with pytest.raises(
        ValueError,
        match="unknown key 'depth'; valid keys under 'the top level': vocab_size, num_layers",
    ):
        config.replace(depth=3)
    with pytest.raises(ValueError, match="unknown key 'mixer.width'; valid keys under 'mixer'"):
        config.replace(**{"mixer.width": 3})
    with pytest.raises(ValueError, match="bad value for 'mixer.num_heads'"):
        config.replace(**{"mixer.num_heads": 0})
    assert config.replace(mixer=nn.MixerConfig(d_model=48)).d_model == 48
    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        models.LMConfig(layer_pattern="gdn,mamba")
    with pytest.raises(ValueError, match="norm_placement"):
        models.LMConfig(norm_placement="post")


def test_parameter_and_flop_counts():
    config = tiny(num_layers=2, layer_pattern="attn")
    model = models.LanguageModel(config, rngs=nnx.Rngs(0))
    d, hidden, vocab = 32, config.hidden, 256
    block = 4 * d * d + 3 * d * hidden + 2 * d  # q k v o, the MLP, two norm scales
    assert models.count_params(model) == vocab * d + 2 * block + d
    cost = models.model_cost(config, seq_len=100)
    assert cost.params == models.count_params(model)
    matmuls = 2 * (2 * (4 * d * d + 3 * d * hidden) + vocab * d)
    attention = 2 * 4 * d * (101 / 2)
    assert cost.forward_flops_per_token == pytest.approx(matmuls + attention)
    assert cost.train_flops_per_token == 3 * cost.forward_flops_per_token
    assert "M parameters" in cost.summary()
    base = models.model_cost(models.LMConfig.preset("base"), seq_len=2048)
    assert 60e6 < base.params < 150e6


def test_sigma_reparam_model_decodes_consistently_in_eval_mode():
    config = tiny(**{"mixer.sigma_reparam": True})
    model = models.LanguageModel(config, rngs=nnx.Rngs(0))
    model.eval()
    prompt = jnp.ones((1, 5), jnp.int32)
    tokens, logits = models.generate(model, prompt, 4, temperature=0, return_logits=True)
    full, _ = model(jnp.concatenate([prompt, tokens], 1))
    assert_close(logits, full[:, 4:8], 1e-4, "σReparam logits")
    assert isinstance(model.blocks[0].mlp.up, nn.Dense) and model.blocks[0].mlp.up.sigma_reparam


def test_peri_ln_normalises_each_sublayer_output():
    pre = models.LanguageModel(tiny(), rngs=nnx.Rngs(0))
    peri = models.LanguageModel(tiny(norm_placement="peri"), rngs=nnx.Rngs(0))
    assert pre.blocks[0].mixer_out_norm is None
    block = peri.blocks[0]
    x = jax.random.normal(jax.random.key(0), (2, 9, 32)) * 5
    y, _ = block(x)
    # the MLP increment is an RMS-normalised vector (unit scale at initialisation)
    h = x + block.mixer_out_norm(block.mixer(block.mixer_norm(x))[0])
    increment = y - h
    assert_close(jnp.sqrt(jnp.mean(increment**2, -1)), jnp.ones((2, 9)), 1e-3, "RMS")


def test_default_initialisation_starts_at_unit_scale():
    """Gemma's convention: E ~ N(0, 1/d) scaled by √d on the way in, so the residual
    stream starts at unit scale per coordinate (the scale of every block's output)
    and the tied logits at unit scale too."""
    config = models.LMConfig.preset("tiny", vocab_size=512)
    model = models.LanguageModel(config, rngs=nnx.Rngs(0))
    d = config.d_model
    assert config.embedding_std == d**-0.5 and config.embedding_scale == d**0.5
    assert abs(float(jnp.std(model.embedding[...])) * d**0.5 - 1) < 0.05
    logits, _ = model(jax.random.randint(jax.random.key(1), (4, 64), 0, 512))
    assert 0.8 < float(jnp.std(logits)) < 1.25
    old = models.LMConfig.preset("tiny", embed_std=0.02, embed_scale=1.0)
    assert (old.embedding_std, old.embedding_scale) == (0.02, 1.0)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="embed_std"):
            models.LMConfig.preset("tiny", embed_std=bad)
