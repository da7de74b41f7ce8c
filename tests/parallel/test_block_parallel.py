"""``parallel.block_parallel``: an op run per device on its block of batch and heads.

The layers call their op this way under a mesh without sequence parallelism when the
kernels may run, since XLA cannot partition a Pallas kernel's custom call. Outputs,
final states and every gradient must equal the single-device op, with the batch and
heads split, and with a batch the mesh does not divide (replicated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import assert_close
from xformjax import ops, parallel
from xformjax.nn import recurrent

B, T, H, K, V = 4, 40, 4, 16, 8


def _inputs(batch: int):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((batch, T, H, K)), jnp.float32) for _ in range(2))
    return {
        "q": q,
        "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "v": jnp.asarray(rng.standard_normal((batch, T, H, V)), jnp.float32),
        "beta": jnp.asarray(rng.uniform(0.1, 1.9, (batch, T, H)), jnp.float32),
        "g": jnp.asarray(np.log(rng.uniform(0.5, 1.0, (batch, T, H))), jnp.float32),
        "g_head": jnp.asarray(np.log(rng.uniform(0.5, 1.0, (H,))), jnp.float32),
        "h0": jnp.asarray(rng.standard_normal((batch, H, K, V)), jnp.float32),
    }


def _value_and_grads(op_name: str, op, x):
    if op_name == "linear_attention":

        def loss(q, k, v, g, h0):
            o, s = op(q, k, v, g=g, initial_state=h0, output_final_state=True)
            return jnp.sum(o * o) + jnp.sum(s)

        args = (x["q"], x["k"], x["v"], x["g_head"], x["h0"])
    else:

        def loss(q, k, v, g, h0):
            o, s = op(q, k, v, x["beta"], g=g, initial_state=h0, output_final_state=True)
            return jnp.sum(o * o) + jnp.sum(s)

        args = (x["q"], x["k"], x["v"], x["g"], x["h0"])
    return jax.value_and_grad(loss, argnums=tuple(range(5)))(*args)


@pytest.mark.parametrize("batch", [B, 1], ids=["batch-split", "batch-replicated"])
@pytest.mark.parametrize("op_name", ["linear_attention", "delta_rule"])
def test_block_parallel_equals_the_single_device_op(op_name, batch):
    op = getattr(ops, op_name)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = _inputs(batch)
    want = _value_and_grads(op_name, op, x)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x: _value_and_grads(op_name, parallel.block_parallel(op, mesh), x))(x)
    for name, a, b in zip(
        ("loss", "q", "k", "v", "g", "h0"), jax.tree.leaves(got), jax.tree.leaves(want)
    ):
        assert_close(a, b, 2e-6, name)


def test_the_layers_run_per_block_only_where_kernels_may_run():
    mesh = parallel.make_mesh({"data": 2, "tensor": 2})
    assert recurrent.kernel_mesh() is None  # no mesh
    with jax.set_mesh(mesh):
        assert recurrent.kernel_mesh() is None  # a CPU: XLA partitions the ops itself
        with ops.compiling_for("tpu"):
            assert recurrent.kernel_mesh() is not None
    with ops.compiling_for("tpu"):
        assert recurrent.kernel_mesh() is None


def test_block_parallel_rejects_other_ops():
    with pytest.raises(ValueError, match="block_parallel supports"):
        parallel.block_parallel(ops.softmax_attention, parallel.make_mesh({"data": 2}))
