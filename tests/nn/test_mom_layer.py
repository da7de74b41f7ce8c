"""The Mixture-of-Memories layer (``mom``) beyond the registry's checks
(tests/nn/test_mixers.py): the layer against a float64 numpy recomputation from its
docstring, routing, and the load-balancing loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from tests.ops.test_mixture_of_memories import reference as mom_reference
from xformjax import nn

# importing the module registers "mom" in nn.MIXERS
from xformjax.nn.mom import MixtureOfMemories, load_balance_loss, top_k_routing

D_MODEL, BATCH, LENGTH = 32, 2, 37
BASE = nn.MixerConfig(
    d_model=D_MODEL, num_heads=2, chunk_size=16, max_seq_len=64, diag_block_size=8, conv_size=3
)
VARIANTS = {
    "mom": {},  # 4 memories, top-2, shared, conv
    "mom-private-negeig-noconv": {
        "shared_memory": False,
        "allow_neg_eigval": True,
        "conv_size": 0,
        "num_memories": 3,
    },
}


def build(variant: str = "mom", **overrides) -> MixtureOfMemories:
    config = dataclasses.replace(BASE, **VARIANTS[variant], **overrides)
    return nn.MIXERS["mom"](config, rngs=nnx.Rngs(0))


def inputs(length: int = LENGTH, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D_MODEL))


def jitted(layer, **kwargs):
    return jax.jit(lambda x, state=None: layer(x, state=state, **kwargs))


# ----------------------------------------------------------------------------- registry checks


# The shared registry tests (tests/nn/test_mixers.py) run these on both variants;
# here the default one (routed + shared memories, short convolutions).


def test_sequence_flops_are_positive_do_not_grow_and_count_the_active_memories():
    for variant in VARIANTS:
        layer = build(variant)
        assert layer.sequence_flops(512) > 0
        assert layer.sequence_flops(8192) == layer.sequence_flops(512), variant
    # (top_k + shared) memories' work: 3 active vs 2 active, same heads and sizes
    assert build(top_k=2).sequence_flops(512) == pytest.approx(
        1.5 * build(top_k=1).sequence_flops(512)
    )


def test_mode_errors():
    with pytest.raises(ValueError, match="supports modes.*got mode='fast'"):
        build()(inputs(5), mode="fast")
    with pytest.raises(ValueError, match=r"d_model=32\]; got shape \(2, 5, 16\)"):
        build()(jnp.ones((2, 5, 16)))


# ----------------------------------------------------------------------------- float64 reference


def weights(dense) -> np.ndarray:
    return np.asarray(dense.kernel[...], np.float64)


def silu(a):
    return a / (1 + np.exp(-a))


def causal_conv(a, conv):
    w = np.asarray(conv.weight[...], np.float64)
    padded = np.concatenate([np.zeros((a.shape[0], w.shape[0] - 1, a.shape[2])), a], 1)
    return sum(w[j] * padded[:, j : j + a.shape[1]] for j in range(w.shape[0]))


def l2(a):
    return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "routed-only"])
def test_layer_matches_its_docstring_in_float64(x64, shared):
    config = dataclasses.replace(
        BASE,
        d_model=24,
        num_memories=4,
        top_k=2,
        shared_memory=shared,
        allow_neg_eigval=True,
        dtype="float64",
    )
    layer = MixtureOfMemories(config, rngs=nnx.Rngs(3))
    x = np.random.default_rng(0).standard_normal((2, 13, 24))
    y, state = jitted(layer)(jnp.asarray(x))
    heads, key_dim, value_dim = 2, config.key_dim, config.value_dim
    memories = 4 + int(shared)

    logits = x @ weights(layer.router)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, -1)[..., :2]
    selected = np.zeros(probs.shape, bool)
    np.put_along_axis(selected, chosen, True, -1)
    routing = np.where(selected, probs, 0) / np.sum(np.where(selected, probs, 0), -1, keepdims=True)
    if shared:
        routing = np.concatenate([routing, np.ones(routing.shape[:-1] + (1,))], -1)

    streams = {
        name: silu(causal_conv(x @ weights(layer.projections[name]), layer.convs[name]))
        for name in ("q", "k", "v")
    }
    q = l2(streams["q"].reshape(2, 13, heads, key_dim))
    k = l2(streams["k"].reshape(2, 13, memories, heads, key_dim))
    v = streams["v"].reshape(2, 13, memories, heads, value_dim)
    beta = (2 / (1 + np.exp(-(x @ weights(layer.beta_proj))))).reshape(2, 13, memories, heads)
    a_log = np.asarray(layer.a_log[...], np.float64)
    dt_bias = np.asarray(layer.dt_bias[...], np.float64)
    log_a = (-np.exp(a_log) * np.logaddexp(0, x @ weights(layer.gate_proj) + dt_bias)).reshape(
        2, 13, memories, heads
    )
    o, final, _ = mom_reference(q, k, v, beta, routing, g=log_a)

    norm_scale = np.asarray(layer.head.norm.scale[...], np.float64)
    normed = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * norm_scale
    gated = normed.reshape(2, 13, -1) * silu(x @ weights(layer.head.gate))
    assert_close(y, gated @ weights(layer.head.out), 1e-9, "MoM layer output")
    assert_close(state.memory, final, 1e-9, "MoM layer memories")

    fraction = selected.sum((0, 1)) / selected.sum()
    aux = 4 * np.sum(fraction * probs.mean((0, 1)))
    assert_close(state.aux_loss, aux, 1e-6, "aux_loss")


# ----------------------------------------------------------------------------- routing


def test_top_k_routing_renormalises_the_chosen_weights():
    probs = np.array([[0.5, 0.1, 0.3, 0.1], [0.05, 0.15, 0.2, 0.6]])
    weights, got_probs, selected = top_k_routing(jnp.log(jnp.asarray(probs)), 2)
    assert_close(got_probs, probs, 1e-6, "probs")
    np.testing.assert_array_equal(
        selected, [[True, False, True, False], [False, False, True, True]]
    )
    assert_close(weights, [[0.625, 0, 0.375, 0], [0, 0, 0.25, 0.75]], 1e-6, "weights")


def test_memories_no_token_is_routed_to_stay_empty_and_the_shared_one_is_always_written():
    layer = build()
    # a zero router gives uniform probabilities: every token picks memories 0 and 1
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
    _, state = jitted(layer)(inputs(12))
    norms = np.sqrt(np.sum(np.asarray(state.memory) ** 2, axis=(2, 3, 4)))  # [B, M+1]
    assert np.all(norms[:, [0, 1, 4]] > 0)  # chosen memories and the shared one
    np.testing.assert_array_equal(norms[:, [2, 3]], 0)
    assert_close(state.aux_loss, 1.0, 1e-6, "uniform router probabilities")


# ----------------------------------------------------------------------------- load balance


def test_load_balance_loss_of_a_hand_made_routing():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    top1 = jnp.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]], bool)
    # f = (3/4, 1/4, 0); P = (0.475, 0.3875, 0.1375); 3 · Σ f·P
    assert_close(load_balance_loss(probs, top1), 1.359375, 1e-6, "top-1")
    top2 = jnp.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], bool)
    # f = (1/2, 1/2, 0): 3 · (0.475 + 0.3875) / 2
    assert_close(load_balance_loss(probs, top2), 1.29375, 1e-6, "top-2")
    assert load_balance_loss(probs, top1).dtype == jnp.float32


def test_load_balance_loss_is_one_at_balance_and_grows_with_imbalance():
    rng = np.random.default_rng(0)
    memories = 4
    random_probs = rng.dirichlet(np.ones(memories), size=(2, 8))
    # perfect balance: every memory gets the same share of the routing slots
    balanced = np.zeros((2, 8, memories), bool)
    balanced[..., 0:2] = np.arange(8)[None, :, None] % 2 == 0
    balanced[..., 2:4] = np.arange(8)[None, :, None] % 2 == 1
    assert_close(
        load_balance_loss(jnp.asarray(random_probs), jnp.asarray(balanced)),
        1.0,
        1e-6,
        "balanced assignments",
    )
    # uniform probabilities: 1 whatever the assignment
    uniform = jnp.full((2, 8, memories), 1 / memories)
    lopsided = jnp.zeros((2, 8, memories), bool).at[..., 0].set(True)
    assert_close(load_balance_loss(uniform, lopsided), 1.0, 1e-6, "uniform probabilities")
    # every token certain about one memory: the maximum, M
    certain = jnp.zeros((2, 8, memories)).at[..., 0].set(1.0)
    assert_close(load_balance_loss(certain, lopsided), float(memories), 1e-6, "collapse")


def test_the_aux_loss_gradient_reaches_the_router_only():
    layer = build()
    x = inputs(9)
    graphdef, params = nnx.split(layer, nnx.Param)

    aux_and_grad = jax.jit(
        jax.value_and_grad(lambda params: nnx.merge(graphdef, params)(x)[1].aux_loss)
    )
    before, grads = aux_and_grad(params)
    flat = dict(nnx.to_flat_state(grads))
    router = np.asarray(flat[("router", "kernel")])
    assert np.all(np.isfinite(router)) and np.any(router != 0)
    for path, value in flat.items():
        if path != ("router", "kernel"):
            assert not np.any(np.asarray(value)), path
    # a small step against that gradient lowers the loss
    after, _ = aux_and_grad(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    assert float(after) < float(before)
