"""The pieces the mixers are built from, each against its defining formula."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn import lightnet, lightning, positional, retnet
from xformjax.nn.recurrent import run_op


def test_taylor_feature_map_is_the_second_order_expansion(x64):
    rng = np.random.default_rng(0)
    dim = 5
    q, k = rng.standard_normal((2, 1, 3, 1, dim))
    phi = nn.FeatureMap("taylor", dim, 1, rngs=nnx.Rngs(0))
    assert phi.output_dim == 1 + dim + dim * dim
    got = jnp.sum(phi(jnp.asarray(q)) * phi(jnp.asarray(k)), -1)
    s = np.sum(q * k, -1) / np.sqrt(dim)
    assert_close(got, 1 + s + s * s / 2, 1e-12, "φ(q)·φ(k)")


def test_hedgehog_feature_map_and_distillation():
    rng = np.random.default_rng(0)
    phi = nn.FeatureMap("hedgehog", 4, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
    y = phi(x)
    assert y.shape == (1, 3, 2, 8)
    assert_close(jnp.sum(y, -1), 2 * jnp.ones((1, 3, 2)), 1e-6, "two softmaxes")
    assert_close(y[..., :4], jax.nn.softmax(x, -1), 1e-6, "identity initialisation")

    config = nn.MixerConfig(d_model=16, num_heads=2, feature_map="hedgehog")
    layer = nn.LinearAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 24, 16))
    optimizer = nnx.Optimizer(layer.feature_map, optax.adam(5e-2), wrt=nnx.Param)
    before = float(nn.hedgehog_loss(layer, x))

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(feature_map):
            q, k, _ = layer.qkv(x)
            return nn.hedgehog_distillation_loss(q, k, feature_map)

        loss, grads = nnx.value_and_grad(loss_fn)(layer.feature_map)
        optimizer.update(layer.feature_map, grads)
        return loss

    for _ in range(60):
        step(layer, optimizer)
    after = float(nn.hedgehog_loss(layer, x))
    assert np.isfinite(before) and after < before - 0.05, (before, after)


def test_mala_readout_matches_its_definition(x64):
    config = nn.MixerConfig(d_model=16, num_heads=2, mala=True)
    layer = nn.LinearAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 9, 16), jnp.float64)
    inputs = layer.prepare(x, None, 0)
    o, _ = run_op(inputs, None, "chunk", 16)
    got = layer._mala(o, inputs.v[..., :-1], None)
    q, k, v = (np.asarray(a, np.float64) for a in (inputs.q, inputs.k, inputs.v[..., :-1]))
    expected = np.zeros_like(v)
    for t in range(9):
        scores = np.einsum("hd,jhd->jh", q[0, t], k[0, : t + 1])  # [j, H]
        total = scores.sum(0)
        weights = (1 + 1 / total) * scores - total / (t + 1)
        np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-9)  # weights sum to one
        expected[0, t] = np.einsum("jh,jhv->hv", weights, v[0, : t + 1])
    assert_close(got, expected, 1e-6, "MALA output")


def test_lightning_decays_follow_alibi_slopes_scaled_by_depth():
    np.testing.assert_allclose(lightning.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    six = lightning.alibi_slopes(6)
    np.testing.assert_allclose(six, list(2.0 ** (-2.0 * np.arange(1, 5))) + [2**-1, 2**-3])
    first = lightning.lightning_log_decay(8, 0, 5)
    last = lightning.lightning_log_decay(8, 4, 5)
    np.testing.assert_allclose(first, -(1 + 1e-5) * 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(last, -1e-5 * 2.0 ** -np.arange(1, 9))
    assert np.all(first < lightning.lightning_log_decay(8, 2, 5))


def test_retnet_decays():
    np.testing.assert_allclose(
        np.exp(retnet.retnet_log_decay(4)), 1 - 2.0 ** -np.array([5, 6, 7, 8])
    )


def test_lightnet_gates_give_the_normalised_additive_sum(x64):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 30, 2, 3)) * 5
    v = rng.standard_normal((1, 30, 2, 4))
    log_z0 = np.full((1, 2, 3), lightnet.EMPTY_LOG)
    keys, log_gate, _ = lightnet.additive_gates(jnp.asarray(k), jnp.asarray(log_z0))
    state = np.zeros((2, 3, 4))
    for t in range(30):
        state = (
            np.exp(np.asarray(log_gate)[0, t])[..., None] * state
            + np.asarray(keys)[0, t][..., None] * v[0, t][:, None, :]
        )
        weights = np.exp(k[0, : t + 1])  # [j, H, K]
        expected = np.einsum("jhk,jhv->hkv", weights, v[0, : t + 1]) / weights.sum(0)[..., None]
        np.testing.assert_allclose(state, expected, rtol=1e-9, atol=1e-12)
    # 64K tokens of large keys: no overflow
    long_k = jnp.asarray(rng.standard_normal((1, 65536, 1, 2)) * 50, jnp.float32)
    keys, log_gate, final = lightnet.additive_gates(long_k, jnp.full((1, 1, 2), -1e30))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (keys, log_gate, final))
    assert float(jnp.max(log_gate)) <= 0 and float(jnp.max(keys)) <= 1


def test_short_conv_is_a_causal_convolution_and_its_cache_continues_it(x64):
    conv = nn.ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 3)))
    y, cache = conv(x)
    w = np.asarray(conv.weight[...])
    padded = np.concatenate([np.zeros((2, 3, 3)), np.asarray(x)], 1)
    expected = sum(w[j] * padded[:, j : j + 11] for j in range(4))
    assert_close(y, expected, 1e-12, "conv")
    y1, c1 = conv(x[:, :5])
    y2, c2 = conv(x[:, 5:], c1)
    assert_close(jnp.concatenate([y1, y2], 1), y, 1e-12, "conv continued")
    assert_close(c2, cache, 1e-12, "conv cache")


@pytest.mark.parametrize("encode", [positional.apply_rope, positional.apply_lrpe])
def test_positional_encodings_are_relative(x64, encode):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8))) for _ in range(2))

    def score(s, t):
        return float(jnp.sum(encode(q, jnp.array([s])) * encode(k, jnp.array([t]))))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_sigma_reparam_normalises_the_spectral_norm():
    dense = nn.Dense(6, 5, axes=("embed", "mlp"), sigma_reparam=True, rngs=nnx.Rngs(0))
    kernel = dense.kernel[...]
    assert_close(dense.effective_kernel(), kernel, 1e-4, "σReparam starts at W")
    dense.kernel[...] = 3.0 * kernel + 0.5  # the spectral norm changes
    for _ in range(30):  # training calls refine the power-iteration estimate
        dense.effective_kernel()
    sigma = np.linalg.norm(np.asarray(dense.effective_kernel()), 2)
    assert sigma == pytest.approx(float(dense.gamma[...]), rel=1e-4)
    dense.eval()
    u = np.asarray(dense.u[...]).copy()
    dense(jnp.ones((2, 6)))
    assert np.array_equal(u, np.asarray(dense.u[...])), "eval mode must not update u"


def test_mixer_config_derived_sizes():
    config = nn.MixerConfig(d_model=64, num_heads=4, expand_v=2.0, num_kv_heads=2)
    assert (config.key_dim, config.value_dim, config.kv_heads) == (16, 32, 2)
    assert dataclasses.replace(config, head_dim=10).key_dim == 10
