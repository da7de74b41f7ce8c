"""Layers against float64 numpy written from their docstrings, using the layers' own
weights: the projections, gates, feature maps and read-outs are recomputed here, the
recurrences are the float64 token-by-token references of ``tests/ops/reference.py``.
Catches a wrong gate formula, sign, temperature or scale that the form-agreement
tests (all built on the same op) cannot see."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops import reference
from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn import lightning

D, H, T = 24, 2, 13
CONFIG = nn.MixerConfig(
    d_model=D, num_heads=H, chunk_size=16, conv_size=3, gate_low_rank=5, dtype="float64"
)


def weights(dense) -> np.ndarray:
    return np.asarray(dense.kernel[...], np.float64)


def silu(x):
    return x / (1 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


def rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def read_out(layer, o, x):
    """``W_o · (SiLU(x W_g) ⊙ RMSNorm(o))`` per head, as the layers' docstrings say."""
    scale = np.asarray(layer.head.norm.scale[...], np.float64)
    normed = rms_norm(o, scale).reshape(*o.shape[:-2], -1)
    gated = normed * silu(x @ weights(layer.head.gate))
    return gated @ weights(layer.head.out)


def heads(a):
    return a.reshape(*a.shape[:-1], H, -1)


def causal_conv(a, conv):
    w = np.asarray(conv.weight[...], np.float64)
    size = w.shape[0]
    padded = np.concatenate([np.zeros((a.shape[0], size - 1, a.shape[2])), a], 1)
    return sum(w[j] * padded[:, j : j + a.shape[1]] for j in range(size))


def l2(a):
    return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)


def inputs():
    return np.random.default_rng(0).standard_normal((2, T, D))


def test_gated_deltanet_layer(x64):
    config = dataclasses.replace(CONFIG, allow_neg_eigval=True)
    layer = nn.GatedDeltaNet(config, rngs=nnx.Rngs(0))
    x = inputs()
    y, _ = layer(jnp.asarray(x))
    streams = {
        name: silu(causal_conv(x @ weights(layer.projections[name]), layer.convs[name]))
        for name in ("q", "k", "v")
    }
    q, k, v = l2(heads(streams["q"])), l2(heads(streams["k"])), heads(streams["v"])
    beta = 2 / (1 + np.exp(-(x @ weights(layer.beta_proj))))
    a_log = np.asarray(layer.a_log[...], np.float64)
    dt_bias = np.asarray(layer.dt_bias[...], np.float64)
    log_a = -np.exp(a_log) * np.logaddexp(0, x @ weights(layer.gate_proj) + dt_bias)
    o, _, _ = reference.delta_product(q, k, v, beta, g=log_a)
    assert_close(y, read_out(layer, o, x), 1e-9, "gated DeltaNet")


@pytest.mark.parametrize("short_conv", [False, True])
def test_gla_layer(x64, short_conv):
    layer = nn.GatedLinearAttention(
        dataclasses.replace(CONFIG, short_conv=short_conv), rngs=nnx.Rngs(0)
    )
    x = inputs()
    y, _ = layer(jnp.asarray(x))
    streams = [x @ weights(getattr(layer.qkv, name)) for name in ("q", "k", "v")]
    if short_conv:  # SiLU(conv(x W_s)) for each stream
        streams = [silu(causal_conv(a, layer.convs[n])) for a, n in zip(streams, "qkv")]
    else:
        assert not layer.convs
    q, k, v = (heads(a) for a in streams)
    logits = x @ weights(layer.gate_down) @ weights(layer.gate_up) + np.asarray(
        layer.gate_up.bias[...], np.float64
    )
    log_alpha = heads(log_sigmoid(logits) / CONFIG.gate_temperature)
    o, _, _ = reference.linear_attention(q, k, v, gk=log_alpha)
    assert_close(y, read_out(layer, o, x), 1e-9, "GLA")


def test_lightning_layer(x64):
    layer = nn.LightningAttention(CONFIG, layer_index=1, num_layers=4, rngs=nnx.Rngs(0))
    x = inputs()
    y, _ = layer(jnp.asarray(x))
    q, k, v = (silu(heads(x @ weights(p))) for p in (layer.qkv.q, layer.qkv.k, layer.qkv.v))
    dim = q.shape[-1]
    theta = 10_000.0 ** (-np.arange(dim) / dim)
    angles = np.arange(T)[:, None, None] * theta  # [T, 1, D]

    def lrpe(a):
        return np.concatenate([a * np.cos(angles), a * np.sin(angles)], -1)

    log_decay = -lightning.alibi_slopes(H) * (1 - 1 / 3 + 1e-5)  # layer 1 of 4
    o, _, _ = reference.linear_attention(lrpe(q), lrpe(k), v, g=log_decay)
    normed = (o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6)).reshape(2, T, -1)
    expected = (normed * silu(x @ weights(layer.head.gate))) @ weights(layer.head.out)
    assert_close(y, expected, 1e-9, "lightning")


def test_retnet_decays_enter_the_layer(x64):
    layer = nn.RetNet(CONFIG, rngs=nnx.Rngs(0))
    inputs_ = layer.prepare(jnp.asarray(inputs()), None, jnp.zeros((), jnp.int32))
    np.testing.assert_allclose(np.exp(np.asarray(inputs_.g)), 1 - 2.0 ** -np.array([5, 6]))
    assert inputs_.gk is None and inputs_.scale is None
    assert jax.tree.leaves(inputs_.extra_state) == []
