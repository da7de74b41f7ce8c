"""Every mixer in ``MIXERS``: its forms agree, decoding with the state equals the
full forward, and every parameter gets a finite, non-zero gradient."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import nn

D_MODEL, BATCH, LENGTH = 32, 2, 37
BASE = nn.MixerConfig(
    d_model=D_MODEL, num_heads=2, chunk_size=16, max_seq_len=64, diag_block_size=8, conv_size=3
)

# (mixer name, config overrides, layer_index, num_layers): every registered name, and
# the options that change the computation.
VARIANTS = {
    "attn": ("attn", {}, 0, 1),
    "attn-gqa-window": ("attn", {"num_heads": 4, "num_kv_heads": 2, "window": 9}, 0, 1),
    "sigmoid_attn": ("sigmoid_attn", {}, 0, 1),
    "linear_attn-elu": ("linear_attn", {}, 0, 1),
    "linear_attn-identity": ("linear_attn", {"feature_map": "identity"}, 0, 1),
    "linear_attn-elu-normalized": ("linear_attn", {"normalize": True}, 0, 1),
    "linear_attn-relu": ("linear_attn", {"feature_map": "relu", "normalize": True}, 0, 1),
    "linear_attn-hedgehog": ("linear_attn", {"feature_map": "hedgehog", "expand_v": 0.5}, 0, 1),
    "linear_attn-taylor": (
        "linear_attn",
        {"feature_map": "taylor", "feature_dim": 4, "normalize": True},
        0,
        1,
    ),
    "linear_attn-mala": ("linear_attn", {"mala": True}, 0, 1),
    "linear_attn-short-conv": ("linear_attn", {"short_conv": True, "mala": True}, 0, 1),
    "transnormer-diag": ("transnormer", {}, 0, 2),
    "transnormer-norm": ("transnormer", {}, 1, 2),
    "lightning": ("lightning", {}, 1, 3),
    "retnet": ("retnet", {"expand_v": 2.0}, 0, 1),
    "retnet-short-conv": ("retnet", {"short_conv": True}, 0, 1),
    "gla": ("gla", {"gate_low_rank": 4}, 0, 1),
    "gla-short-conv": ("gla", {"gate_low_rank": 4, "short_conv": True, "conv_size": 3}, 0, 1),
    "lightnet": ("lightnet", {}, 0, 1),
    "deltanet": ("deltanet", {}, 0, 1),
    "deltanet-negative-eigenvalues": ("deltanet", {"allow_neg_eigval": True, "conv_size": 0}, 0, 1),
    "gated_deltanet": ("gated_deltanet", {"allow_neg_eigval": True}, 0, 1),
    "deltaproduct": ("deltaproduct", {"num_householder": 3, "head_dim": 12}, 0, 1),
    "diag_rnn-negative-eigenvalues": (
        "diag_rnn",
        {"allow_neg_eigval": True, "expand_v": 0.5},
        0,
        1,
    ),
    "aaren": ("aaren", {}, 0, 1),
    "aaren-no-gate": ("aaren", {"output_gate": False, "expand_v": 0.5}, 0, 1),
    "mom": ("mom", {}, 0, 1),
    "mom-private-negeig-noconv": (
        "mom",
        {"shared_memory": False, "allow_neg_eigval": True, "conv_size": 0, "num_memories": 3},
        0,
        1,
    ),
    "titans-mal": ("titans", {"memory_depth": 2}, 0, 1),
    "titans-mag": (
        "titans",
        {"titans_variant": "mag", "memory_window": 8, "persistent_tokens": 2},
        0,
        1,
    ),
    "titans-mac": ("titans", {"titans_variant": "mac", "persistent_tokens": 2}, 0, 1),
    "atlas": ("atlas", {}, 0, 1),
}


def test_every_registered_mixer_has_a_variant_here():
    assert set(nn.MIXERS) == {name for name, *_ in VARIANTS.values()}
    assert set(nn.MIXERS) == {
        "attn",
        "sigmoid_attn",
        "linear_attn",
        "transnormer",
        "lightning",
        "retnet",
        "gla",
        "lightnet",
        "deltanet",
        "gated_deltanet",
        "deltaproduct",
        "mom",
        "titans",
        "atlas",
        "aaren",
        "diag_rnn",
    }


def build(variant: str) -> nn.Mixer:
    name, overrides, layer_index, num_layers = VARIANTS[variant]
    config = dataclasses.replace(BASE, **overrides)
    return nn.MIXERS[name](config, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(0))


def inputs(length: int = LENGTH, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, length, D_MODEL))


def jitted(layer: nn.Mixer, run):
    """``run(module, *args)`` as one jitted program over ``layer``'s variables (an eager
    layer dispatches every primitive and compiles each op's program on its own)."""
    graphdef, variables = nnx.split(layer)
    compiled = jax.jit(lambda variables, *args: run(nnx.merge(graphdef, variables), *args))
    return lambda *args: compiled(variables, *args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forms_agree(variant):
    layer, x = build(variant), inputs()
    modes = layer.modes
    outputs = jitted(layer, lambda m, x: [m(x, mode="chunk")[0]] + [m(x, mode=f)[0] for f in modes])
    reference, *others = outputs(x)
    assert reference.shape == x.shape
    for mode, y in zip(modes, others, strict=True):
        assert_close(y, reference, 1e-4, f"{variant} {mode} vs chunk")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_with_the_state_equals_the_full_forward(variant):
    layer, x = build(variant), inputs()

    def full_and_continued(module, x):
        full, final = module(x)
        # a prefix in chunk mode, then the rest (several tokens at once) from its state
        _, prefix_state = module(x[:, :20])
        rest, _ = module(x[:, 20:], state=prefix_state)
        return full, final, rest

    full, final, rest = jitted(layer, full_and_continued)(x)
    state = layer.init_state(BATCH, LENGTH)
    step = jitted(layer, lambda m, x_t, s: m(x_t, state=s))
    pieces = []
    for t in range(LENGTH):
        y_t, state = step(x[:, t : t + 1], state)
        pieces.append(y_t)
    assert_close(jnp.concatenate(pieces, 1), full, 1e-4, f"{variant} token by token")
    assert int(state.position) == LENGTH
    assert_close(rest, full[:, 20:], 1e-4, f"{variant} continued from a prefix state")
    final_leaves = dict(jax.tree_util.tree_leaves_with_path(final))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        # KV caches (and their documents) differ in capacity; an auxiliary loss is the
        # last call's, not a state
        if path[0].name not in ("k", "v", "segment_ids", "aux_loss"):
            key = jax.tree_util.keystr(path)
            assert_close(leaf, final_leaves[path], 1e-4, f"{variant} final state{key}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_finite_nonzero_gradient(variant):
    layer, x = build(variant), inputs(length=21)
    cotangent = jax.random.normal(jax.random.key(7), x.shape)

    def loss(module):
        y, _ = module(x)
        return jnp.sum(y * cotangent)

    grads = nnx.jit(nnx.grad(loss))(layer)
    flat = nnx.to_flat_state(grads)
    assert flat, "no parameters"
    for path, value in flat:
        value = np.asarray(value)
        where = f"{variant} d{'/'.join(map(str, path))}"
        assert np.all(np.isfinite(value)), where
        assert np.any(value != 0), f"{where} is all zero"


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_computation_stays_close(variant):
    name, overrides, layer_index, num_layers = VARIANTS[variant]
    config = dataclasses.replace(BASE, dtype="bfloat16", **overrides)
    low = nn.MIXERS[name](config, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(0))
    high = build(variant)
    x = inputs()
    y_low = jitted(low, lambda m, x: m(x)[0])(x.astype(jnp.bfloat16))
    y_high = jitted(high, lambda m, x: m(x)[0])(x)
    assert y_low.dtype == jnp.bfloat16
    assert_close(y_low.astype(jnp.float32), y_high, 2e-2, f"{variant} bfloat16")


def test_sequence_flops_are_positive_and_linear_families_do_not_grow_with_length():
    for variant in VARIANTS:
        layer = build(variant)
        short, long = layer.sequence_flops(512), layer.sequence_flops(8192)
        assert short > 0, variant
        if not isinstance(layer, nn.Attention) and variant != "transnormer-diag":
            assert long == short, variant
    attention = build("attn")
    assert attention.sequence_flops(8192) > 10 * attention.sequence_flops(512)


def test_mode_and_input_errors():
    layer = build("gated_deltanet")
    with pytest.raises(ValueError, match=r"d_model=32\]; got shape \(2, 5, 16\)"):
        layer(jnp.ones((2, 5, 16)))
    with pytest.raises(ValueError, match="no tokens"):
        layer(jnp.ones((2, 0, D_MODEL)))
    with pytest.raises(ValueError, match="supports modes.*got mode='fast'"):
        layer(inputs(), mode="fast")
    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        nn.get_mixer("mamba")
    with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
        nn.MixerConfig(num_heads=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="feature_map"):
        nn.MixerConfig(feature_map="cosine")
    attention = build("attn")
    state = attention.init_state(BATCH, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; 0 are used and 5 more"):
        attention(inputs(5), state=state)
    # inside jit the overflow cannot raise: the outputs are NaN, never silently wrong
    step = jax.jit(lambda x_t, s: attention(x_t, state=s))
    x = inputs(6)
    outputs = []
    for t in range(6):
        y_t, state = step(x[:, t : t + 1], state)
        outputs.append(y_t)
    assert all(bool(jnp.all(jnp.isfinite(y))) for y in outputs[:4])
    assert all(bool(jnp.all(jnp.isnan(y))) for y in outputs[4:])


def test_every_mixer_documents_its_paper_and_recurrence():
    import inspect
    import re

    for name, cls in nn.MIXERS.items():
        module_doc = inspect.getmodule(cls).__doc__ or ""
        assert cls.__doc__, name
        assert re.search(r'"[A-Z][^"]{8,}", [A-Z][a-z]+ et al\. 20\d\d', module_doc), (
            f'{name}: no paper named ("Title", Author et al. year)'
        )
        assert re.search(r"(S_t|o_[ti]) +=", module_doc), f"{name}: no recurrence written out"


def test_parameters_carry_logical_axis_names():
    allowed = {"embed", "heads", "kv", "mlp", "vocab", None}
    for variant in VARIANTS:
        layer = build(variant)
        for path, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            names = variable.get_metadata().get("out_sharding")
            where = f"{variant} {'/'.join(map(str, path))}"
            assert names is not None, f"{where} has no logical axis names"
            assert len(names) == variable.ndim, where
            assert set(names) <= allowed, where
            if variable.ndim == 2:
                assert set(names) != {None}, f"{where}: a matrix with no named axis"
    attention = build("attn-gqa-window")
    assert attention.k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "kv")
