"""``LMConfig.remat`` (named ``jax.checkpoint`` policies per block) and
``LMConfig.scan_layers`` (the rounds of the layer pattern stacked and scanned):
validation, equal values and gradients, decoding, and one compiled round."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tests.ops.helpers import assert_close
from xformjax import parallel, train
from xformjax.models import LanguageModel, LMConfig, generate, model_cost
from xformjax.models.lm import REMAT_POLICIES

VOCAB = 64


def config(**overrides) -> LMConfig:
    base = {
        "num_layers": 4,
        "layer_pattern": "gated_deltanet,attn",
        "vocab_size": VOCAB,
        "mixer.d_model": 32,
        "mixer.num_heads": 2,
        "mixer.chunk_size": 16,
    }
    return LMConfig.preset("tiny", **{**base, **overrides})


TOKENS = jax.random.randint(jax.random.key(0), (2, 32), 0, VOCAB)


def loss_and_logits(model: LanguageModel, tokens: jax.Array):
    logits, _ = model(tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
    return jnp.mean(nll), logits


def loss_fn(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    return loss_and_logits(model, tokens)[0]


#: ``(model, tokens) → ((loss, logits), grads)``
value_and_grad = nnx.jit(nnx.value_and_grad(loss_and_logits, has_aux=True))


def stacked(pure: dict, period: int, rounds: int) -> dict:
    """An unscanned model's pure state dict in the scanned model's layout."""
    out = {key: value for key, value in pure.items() if key != "blocks"}
    layers = pure["blocks"]
    out["stacks"] = {
        j: jax.tree.map(lambda *a: jnp.stack(a), *[layers[j + r * period] for r in range(rounds)])
        for j in range(period)
    }
    return out


def assert_trees_close(got, want, tol: float) -> None:
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
        assert_close(a, b, tol, jax.tree_util.keystr(path))


def test_config_validation_and_overrides():
    assert config().remat == "none" and config().scan_layers is False
    with pytest.raises(ValueError, match="`remat` must be one of 'none', 'full', 'dots'"):
        config(remat="everything")
    with pytest.raises(TypeError, match="`remat` must be one of"):
        dataclasses.replace(config(), remat=1)
    with pytest.raises(TypeError, match="`scan_layers` must be a bool"):
        dataclasses.replace(config(), scan_layers="yes")
    with pytest.raises(ValueError, match="pattern's length to divide `num_layers`; got 2 mixers"):
        config(num_layers=3, scan_layers=True)
    assert set(REMAT_POLICIES) | {"none"} == {"none", "full", "dots", "dots_no_batch"}
    experiment = train.load_config("tiny", ["model.remat=dots", "model.scan_layers=true"])
    assert experiment.model.remat == "dots" and experiment.model.scan_layers is True
    # a mixer whose static attributes depend on the depth cannot be stacked
    with pytest.raises(ValueError, match="'lightning' layers differ in structure"):
        LanguageModel(config(layer_pattern="lightning", scan_layers=True), rngs=nnx.Rngs(0))


def test_remat_policies_give_the_same_loss_and_gradients():
    small = {"num_layers": 1, "layer_pattern": "attn"}  # (each policy costs a compile)
    reference = LanguageModel(config(**small), rngs=nnx.Rngs(0))
    (loss_ref, _), grads_ref = value_and_grad(reference, TOKENS)
    for policy in REMAT_POLICIES:
        model = LanguageModel(config(remat=policy, **small), rngs=nnx.Rngs(0))
        jaxpr = str(jax.make_jaxpr(lambda t, m=model: loss_fn(m, t))(TOKENS))
        assert len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr)) == 1, policy
        (loss, _), grads = value_and_grad(model, TOKENS)
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6), policy
        assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_ref), 1e-6)


def test_scanned_model_equals_the_unscanned_one_with_its_parameters():
    # σReparam: the forward updates non-parameter state, written back through the scan
    options = {"mixer.sigma_reparam": True, "layer_pattern": "linear_attn,attn"}
    reference = LanguageModel(config(**options), rngs=nnx.Rngs(1))
    scanned = LanguageModel(config(scan_layers=True, **options), rngs=nnx.Rngs(2))
    assert scanned.blocks is None and len(scanned.stacks) == 2 and scanned.rounds == 2
    kernel = scanned.stacks[0].mlp.up.kernel
    assert kernel.shape == (2, 32, 88) and kernel.get_metadata()["out_sharding"][0] is None
    # built like the unscanned model, then stacked: the same seed, the same parameters
    same_seed = LanguageModel(config(**options), rngs=nnx.Rngs(2))
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(scanned)),
        stacked(nnx.to_pure_dict(nnx.state(same_seed)), 2, 2),
        0,
    )
    # different seeds: copy the reference's variables into the scanned model
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, stacked(nnx.to_pure_dict(nnx.state(reference)), 2, 2))
    nnx.update(scanned, state)
    assert_close(
        scanned.layer(3).mlp.up.kernel[...], reference.blocks[3].mlp.up.kernel[...], 0, "W"
    )
    (loss_ref, logits_ref), grads_ref = value_and_grad(reference, TOKENS)
    (loss, logits), grads = value_and_grad(scanned, TOKENS)
    assert_close(logits, logits_ref, 1e-5, "logits")
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    assert_trees_close(nnx.to_pure_dict(grads), stacked(nnx.to_pure_dict(grads_ref), 2, 2), 1e-5)
    # the power-iteration vectors the forward passes updated agree too
    vectors = nnx.to_pure_dict(nnx.state(scanned, nnx.Not(nnx.Param)))
    vectors_ref = stacked(nnx.to_pure_dict(nnx.state(reference, nnx.Not(nnx.Param))), 2, 2)
    assert jax.tree.leaves(vectors)
    assert_trees_close(vectors, vectors_ref, 1e-5)
    # FLOPs and parameters are counted through the stacks
    assert model_cost(scanned, 32) == model_cost(reference, 32)


def test_scanned_model_with_remat_decodes_greedily_like_its_full_forward():
    model = LanguageModel(config(scan_layers=True, remat="full"), rngs=nnx.Rngs(3))
    cache = model.init_cache(2, 12)
    assert len(cache) == 2 and cache[1].position.shape == (2,)
    prompt = TOKENS[:, :5]
    tokens, logits = generate(model, prompt, 6, temperature=0, return_logits=True)
    full, _ = nnx.jit(lambda m, t: m(t))(model, jnp.concatenate([prompt, tokens[:, :-1]], 1))
    assert_close(logits, full[:, 4:], 1e-5, "decoded logits")
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(full[:, 4:], -1)))
    with pytest.raises(ValueError, match="2 entries for 1 pattern entries"):
        LanguageModel(
            config(num_layers=2, layer_pattern="attn", scan_layers=True), rngs=nnx.Rngs(0)
        )(TOKENS, cache)


def _program(num_layers: int, scan_layers: bool) -> str:
    model = LanguageModel(config(num_layers=num_layers, scan_layers=scan_layers), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        return loss_fn(nnx.merge(graphdef, state), tokens)

    return jax.jit(jax.value_and_grad(loss)).lower(state, TOKENS).as_text()


def test_scanned_program_holds_one_round_whatever_the_depth():
    programs = {(n, scan): _program(n, scan) for n in (4, 8) for scan in (False, True)}
    dots = {key: text.count("stablehlo.dot_general") for key, text in programs.items()}
    assert dots[8, True] == dots[4, True] < dots[4, False] < dots[8, False], dots
    assert "stablehlo.while" in programs[4, True]


def test_scanned_parameters_shard_with_an_unsharded_round_axis():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    scan_config = config(scan_layers=True, **{"mixer.num_heads": 4})
    model = parallel.create_sharded(lambda: LanguageModel(scan_config, rngs=nnx.Rngs(0)), mesh)
    specs = {
        "/".join(map(str, path)): value[...].sharding.spec
        for path, value in nnx.to_flat_state(nnx.state(model))
    }
    assert specs["stacks/0/mlp/down/kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["stacks/1/mixer/q_proj/kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert specs["embedding"] == PartitionSpec("tensor", "fsdp")
