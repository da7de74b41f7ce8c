"""The language model keeps packed documents apart: each document of a packed row gets
the logits and gradients it gets alone, on one device and under LASP-2 with a document
boundary inside another device's shard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_packing import documents, segment_ids
from tests.ops.helpers import assert_close
from xformjax import parallel
from xformjax.models import LanguageModel, LMConfig

LENGTH = 32
# row 0: three documents and padding; row 1: a boundary at 20, inside the third of
# four 8-token shards under `seq` = 4
ROWS = ((9, 14, 6), (20, 12))
CONFIG = LMConfig.preset(
    "tiny",
    num_layers=3,
    layer_pattern="gated_deltanet,attn,gla",
    vocab_size=64,
    **{"mixer.d_model": 32, "mixer.num_heads": 2, "mixer.chunk_size": 8, "mixer.conv_size": 3},
)


def _tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(3), (len(ROWS), LENGTH), 0, CONFIG.vocab_size)


def _weights(ids) -> jax.Array:
    shape = (len(ROWS), LENGTH, CONFIG.vocab_size)
    return jax.random.normal(jax.random.key(4), shape) * (ids > 0)[..., None]


def _packed_loss(model, tokens, ids, weights):
    logits, _ = model(tokens, segment_ids=ids)
    return jnp.sum(logits * weights), logits


def _alone_loss(model, tokens, weights):
    total, outputs = 0.0, []
    for b, start, end in documents(ROWS):
        logits, _ = model(tokens[b : b + 1, start:end])
        total = total + jnp.sum(logits * weights[b : b + 1, start:end])
        outputs.append(logits)
    return total, outputs


def _assert_same_gradients(got, want, what: str) -> None:
    for (path, g), (_, w) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
        assert_close(g[...], w[...], 1e-5, f"{what}: d{'/'.join(map(str, path))}")


@pytest.fixture(scope="module")
def reference():
    model = LanguageModel(CONFIG, rngs=nnx.Rngs(0))
    tokens, ids = _tokens(), jnp.asarray(segment_ids(ROWS, LENGTH))
    weights = _weights(ids)
    packed = nnx.jit(nnx.value_and_grad(_packed_loss, has_aux=True))(model, tokens, ids, weights)
    alone = nnx.jit(nnx.value_and_grad(_alone_loss, has_aux=True))(model, tokens, weights)
    return model, tokens, ids, weights, packed, alone


def test_each_packed_document_gets_the_logits_and_gradients_it_gets_alone(reference):
    _, _, _, _, ((_, logits), grads), ((_, alone_logits), alone_grads) = reference
    for (b, start, end), want in zip(documents(ROWS), alone_logits, strict=True):
        assert_close(logits[b : b + 1, start:end], want, 1e-5, f"logits [{b}, {start}:{end}]")
    _assert_same_gradients(grads, alone_grads, "packed vs alone")


def test_explicit_positions_equal_the_derived_ones(reference):
    model, tokens, ids, _, ((_, logits), _), _ = reference
    positions = np.zeros((len(ROWS), LENGTH), np.int32)
    for b, start, end in documents(ROWS):
        positions[b, start:end] = np.arange(end - start)
    explicit, _ = nnx.jit(lambda m, t: m(t, segment_ids=ids, positions=positions))(model, tokens)
    real = (ids > 0)[..., None]  # padding's positions are left at 0 here
    assert_close(explicit * real, logits * real, 1e-6, "explicit positions")


def test_packed_rows_under_lasp2_equal_one_device(reference):
    model, tokens, ids, weights, ((loss, logits), grads), _ = reference
    mesh = parallel.make_mesh({"seq": 4}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        (sharded_loss, sharded_logits), sharded_grads = nnx.jit(
            nnx.value_and_grad(_packed_loss, has_aux=True)
        )(model, tokens, ids, weights)
        jaxpr = str(jax.make_jaxpr(lambda t: model(t, segment_ids=ids)[0])(tokens))
    # the recurrent layers ran LASP-2, attention LASP-2H
    assert jaxpr.count("shard_map[") == 3
    assert_close(sharded_logits, logits, 1e-5, "logits under seq=4")
    assert float(sharded_loss) == pytest.approx(float(loss), rel=1e-5)
    _assert_same_gradients(sharded_grads, grads, "seq=4 vs one device")


def test_bad_segment_ids_are_a_clear_error():
    model = LanguageModel(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LanguageModel: `segment_ids` must be \[B, T\]"):
        model(_tokens(), segment_ids=jnp.ones((2, 5), jnp.int32))
