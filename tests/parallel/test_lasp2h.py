"""LASP-2H: softmax / sigmoid attention split along T equals the single-device op;
full attention all-gathers K/V once, a sliding window only exchanges its halo."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.ops.helpers import assert_close
from tests.parallel.test_lasp import _collectives
from xformjax import ops
from xformjax.parallel import sequence_parallel

B, T, HQ, HKV, D, V = 2, 64, 4, 2, 8, 6

# row 0: documents of 10, 30 and 24 tokens; row 1: 40 and 24
PACKED_IDS = jnp.asarray([[1] * 10 + [2] * 30 + [3] * 24, [1] * 40 + [2] * 24], jnp.int32)

CASES = {
    "causal": (ops.softmax_attention, {}),
    "sigmoid-causal": (ops.sigmoid_attention, {}),
    "bidirectional": (ops.softmax_attention, {"causal": False}),
    "window-one-halo": (ops.softmax_attention, {"window": 9}),
    "window-two-halos": (ops.sigmoid_attention, {"window": 20}),
    # one bias per query (the sigmoid_attn layer's default): split along T with the queries
    "sigmoid-per-query-bias": (
        ops.sigmoid_attention,
        {"bias": 1.0 - jnp.log(jnp.arange(1.0, T + 1.0))},
    ),
    "window-wide": (ops.softmax_attention, {"window": 50}),
    # packed documents whose beginnings fall inside other devices' shards (16 tokens
    # each): the keys' ids are gathered with the keys
    "packed": (ops.softmax_attention, {"segment_ids": PACKED_IDS}),
    "packed-sigmoid-window": (ops.sigmoid_attention, {"segment_ids": PACKED_IDS, "window": 20}),
}


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:4]), ("seq",))


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "q": jnp.asarray(rng.standard_normal((B, T, HQ, D)), jnp.float32),
        "k": jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal((B, T, HKV, V)), jnp.float32),
    }


@pytest.mark.parametrize("case", CASES)
def test_matches_the_single_device_op(mesh, case):
    op, options = CASES[case]
    parallel = sequence_parallel(op, mesh)
    inputs = _inputs()
    o_ref, _ = op(**inputs, **options)
    o, state = jax.jit(lambda x: parallel(**x, **options))(inputs)
    assert state is None
    assert_close(o, o_ref, 1e-5, f"{case} o")
    cotangent = jax.random.normal(jax.random.key(2), o_ref.shape)
    grads_ref = jax.grad(lambda x: jnp.sum(op(**x, **options)[0] * cotangent))(inputs)
    grads = jax.jit(jax.grad(lambda x: jnp.sum(parallel(**x, **options)[0] * cotangent)))(inputs)
    for name in inputs:
        assert_close(grads[name], grads_ref[name], 1e-5, f"{case} d{name}")


def test_communication_pattern(mesh):
    inputs = _inputs()
    full = sequence_parallel(ops.softmax_attention, mesh)
    jaxpr = str(jax.make_jaxpr(lambda x: full(**x))(inputs))
    assert _collectives(jaxpr) == {"all_gather": 1}
    halo = str(jax.make_jaxpr(lambda x: full(**x, window=9))(inputs))
    assert _collectives(halo) == {"ppermute": 1}
    two = str(jax.make_jaxpr(lambda x: full(**x, window=20))(inputs))
    assert _collectives(two) == {"ppermute": 2}


def test_errors(mesh):
    parallel = sequence_parallel(ops.softmax_attention, mesh)
    inputs = _inputs()
    with pytest.raises(ValueError, match="window needs causal=True"):
        parallel(**inputs, causal=False, window=5)
    with pytest.raises(ValueError, match="divisible by the 'seq' axis size 4"):
        parallel(inputs["q"][:, :30], inputs["k"][:, :30], inputs["v"][:, :30])
