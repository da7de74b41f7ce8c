"""``parallel.hlo``: the collectives of a compiled program, read from its HLO text.

On the 8 host devices: a ``shard_map`` with one all-gather under a named scope and one
psum, forward and backward; the parser must find each collective once, with its kind,
its bytes on one device and whether it belongs to the scope and to the backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from xformjax.parallel import hlo


def test_collectives_of_a_compiled_shard_map_forward_and_backward():
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))

    def body(a):
        with jax.named_scope("gathered"):
            whole = jax.lax.all_gather(a, "x")  # [4, 8, 16] float32 on every device
        return jax.lax.psum(jnp.sum(whole * whole), "x")

    step = jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec())
    spec = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    forward = jax.jit(step).trace(spec).lower().compile().as_text()
    found = hlo.collectives(forward)
    gathers = [c for c in found if c.kind == "all-gather"]
    assert len(gathers) == 1 and gathers[0].bytes == 4 * 8 * 16 * 4
    assert gathers[0].in_scope("gathered") and not gathers[0].backward
    assert {c.kind for c in found} <= {"all-gather", "all-reduce"}

    backward = jax.jit(jax.grad(lambda a: step(a))).trace(spec).lower().compile().as_text()
    transposed = [c for c in hlo.collectives(backward) if c.backward]
    # the all-gather's transpose: a reduce-scatter (or an all-reduce XLA rewrites it into)
    assert transposed and {c.kind for c in transposed} <= {"reduce-scatter", "all-reduce"}
    assert any(c.in_scope("gathered") for c in transposed)
