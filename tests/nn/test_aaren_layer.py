"""The ``aaren`` mixer beyond the registry's checks (tests/nn/test_mixers.py): its
state, and the layer against an independent float64 numpy computation from its own
weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn.aaren import Aaren

D_MODEL, BATCH, LENGTH = 32, 2, 37
BASE = nn.MixerConfig(
    d_model=D_MODEL, num_heads=2, chunk_size=16, max_seq_len=64, diag_block_size=8, conv_size=3
)
VARIANTS = {
    "aaren": {},
    "aaren-no-gate-narrow-values": {"output_gate": False, "expand_v": 0.5, "num_heads": 4},
}


def build(variant: str, **extra) -> Aaren:
    config = dataclasses.replace(BASE, **VARIANTS[variant], **extra)
    return nn.MIXERS["aaren"](config, rngs=nnx.Rngs(0))


def inputs(length: int = LENGTH, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D_MODEL))


def test_registered_under_its_name():
    assert nn.MIXERS["aaren"] is Aaren
    assert nn.get_mixer("aaren") is Aaren


def test_the_state_has_a_constant_size_and_starts_empty():
    layer = build("aaren")
    small, large = layer.init_state(BATCH, 8), layer.init_state(BATCH, 4096)
    for key in (field.name for field in dataclasses.fields(small)):
        assert getattr(small, key).shape == getattr(large, key).shape, key
    assert small.numerator.shape == (BATCH, 2, 16)
    assert bool(jnp.all(jnp.isneginf(small.max)))
    x = inputs(20)
    y_none, state_none = layer(x)
    y_empty, state_empty = layer(x, state=small)
    assert_close(y_empty, y_none, 1e-7, "state=init_state(...) vs state=None")
    for key in (field.name for field in dataclasses.fields(state_none)):
        assert_close(getattr(state_empty, key), getattr(state_none, key), 1e-7, key)


def _numpy_layer(layer: Aaren, x: np.ndarray) -> np.ndarray:
    """The layer recomputed in float64 from its weights, as causal softmax attention
    of the learned query over all earlier tokens (a T×T masked softmax)."""
    config = layer.config
    heads, key_dim, value_dim = config.num_heads, config.key_dim, config.value_dim
    weight = {
        name: np.asarray(module.kernel[...], np.float64)
        for name, module in (("k", layer.k_proj), ("v", layer.v_proj), ("o", layer.head.out))
    }
    query = np.asarray(layer.query[...], np.float64)
    batch, length, _ = x.shape
    k = (x @ weight["k"]).reshape(batch, length, heads, key_dim)
    v = (x @ weight["v"]).reshape(batch, length, heads, value_dim)
    scores = np.einsum("hk,bthk->bht", query, k) / np.sqrt(key_dim)  # [B, H, T]
    causal = np.tril(np.ones((length, length), bool))
    logits = np.where(causal, scores[:, :, None, :], -np.inf)  # [B, H, t, i]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum("bhti,bihv->bthv", weights, v).reshape(batch, length, heads * value_dim)
    if config.output_gate:
        gate = x @ np.asarray(layer.head.gate.kernel[...], np.float64)
        o = o * gate / (1 + np.exp(-gate))
    return o @ weight["o"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_an_independent_float64_computation(variant):
    layer, x = build(variant), inputs(seed=3)
    expected = _numpy_layer(layer, np.asarray(x, np.float64))
    for mode in layer.modes:
        y, _ = layer(x, mode=mode)
        assert_close(y, expected, 1e-5, f"{variant} {mode} vs numpy")
