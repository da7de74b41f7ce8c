"""Mixers inside a Linen model through ``xformjax.nn.linen``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen, nnx

from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn import linen as xlinen

CONFIG = nn.MixerConfig(d_model=32, num_heads=2, chunk_size=16)


class TwoMixerModel(linen.Module):
    """A small Linen model: gated DeltaNet, then attention, then a Linen head."""

    @linen.compact
    def __call__(self, x):
        y, _ = xlinen.mixer("gated_deltanet", CONFIG, name="gdn")(x)
        x = x + y
        y, _ = xlinen.mixer("attn", CONFIG, layer_index=1, num_layers=2, name="attn")(x)
        return linen.Dense(1, name="head")(x + y)


def _unbox(tree):
    return jax.tree.map(
        lambda a: a.unbox() if isinstance(a, linen.meta.AxisMetadata) else a,
        tree,
        is_leaf=lambda a: isinstance(a, linen.meta.AxisMetadata),
    )


def test_bridged_mixers_match_the_nnx_modules_and_train():
    model = TwoMixerModel()
    x = jax.random.normal(jax.random.key(0), (2, 10, 32))
    target = jax.random.normal(jax.random.key(1), (2, 10, 1))
    variables = model.init(jax.random.key(2), x)
    params = _unbox(variables["params"])
    assert set(params) == {"gdn", "attn", "head"}

    # the same weights in the NNX modules give the same output
    gdn = nn.GatedDeltaNet(CONFIG, rngs=nnx.Rngs(0))
    attn = nn.Attention(CONFIG, layer_index=1, num_layers=2, rngs=nnx.Rngs(0))
    nnx.update(gdn, nnx.State(params["gdn"]))
    nnx.update(attn, nnx.State(params["attn"]))
    h = x + gdn(x)[0]
    h = h + attn(h)[0]
    expected = h @ params["head"]["kernel"] + params["head"]["bias"]
    assert_close(model.apply(variables, x), expected, 1e-6, "Linen vs NNX")

    # one optimiser step on the Linen parameters lowers the loss
    def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x) - target) ** 2)

    optimizer = optax.adam(1e-2)
    params = variables["params"]
    state = optimizer.init(params)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    updates, state = optimizer.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    assert float(loss_fn(new_params)) < float(loss)


def test_every_mixer_can_be_bridged():
    """Each bridged mixer computes what its NNX module does with the same weights."""
    x = jax.random.normal(jax.random.key(3), (1, 5, 32))
    for name in nn.MIXERS:
        (y, state), variables = xlinen.mixer(name, CONFIG).init_with_output(jax.random.key(0), x)
        module = nn.MIXERS[name](CONFIG, rngs=nnx.Rngs(1))  # other initial weights
        nnx.update(module, nnx.State(_unbox(variables["params"])))
        expected, _ = module(x)
        assert int(state.position) == 5, name
        assert_close(y, expected, 1e-6, f"bridged {name}")


def test_sigma_reparam_estimates_advance_through_the_bridge():
    config = nn.MixerConfig(d_model=32, num_heads=2, chunk_size=16, sigma_reparam=True)
    layer = xlinen.mixer("gla", config)
    x = jnp.ones((1, 4, 32))
    variables = layer.init(jax.random.key(0), x)
    assert "SpectralVector" in variables
    _, updated = layer.apply(variables, x, mutable=["SpectralVector"])
    before = jax.tree.leaves(_unbox(variables["SpectralVector"]))
    after = jax.tree.leaves(_unbox(updated["SpectralVector"]))
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))
