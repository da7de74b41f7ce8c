"""Compile-time memory: the chunk forms are linear in T, the parallel forms quadratic.

Measured with ``jax.jit(f).lower(...).compile().memory_analysis()`` on
forward+backward, nothing is executed (timings belong in experiments/bench).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from xformjax import ops

# compiled programs' memory (buffer assignment) as the optimised compile plans it
pytestmark = pytest.mark.optimized

HEADS, DIM = 2, 32


def temp_bytes(fn, length: int) -> int:
    """Temporary (scratch) bytes XLA plans for ``grad(sum(fn(q, k, v)))`` at length T."""
    spec = jax.ShapeDtypeStruct((1, length, HEADS, DIM), jnp.float32)
    gate = jax.ShapeDtypeStruct((1, length, HEADS), jnp.float32)
    loss = lambda q, k, v, g: jnp.sum(fn(q, k, v, g))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(spec, spec, spec, gate).compile()
    return compiled.memory_analysis().temp_size_in_bytes


FORMS = {
    "linear-chunk": lambda q, k, v, g: ops.linear_attention(q, k, v, g=g, mode="chunk")[0],
    "linear-parallel": lambda q, k, v, g: ops.linear_attention(q, k, v, g=g, mode="parallel")[0],
    "delta-chunk": lambda q, k, v, g: ops.delta_rule(q, k, v, jax.nn.sigmoid(g), g=g, mode="chunk")[
        0
    ],
    "delta-parallel": lambda q, k, v, g: ops.delta_rule(
        q, k, v, jax.nn.sigmoid(g), g=g, mode="parallel"
    )[0],
    "softmax-chunk": lambda q, k, v, g: ops.softmax_attention(q, k, v, mode="chunk")[0],
    "softmax-parallel": lambda q, k, v, g: ops.softmax_attention(q, k, v, mode="parallel")[0],
}


@pytest.mark.parametrize("form", ["linear-chunk", "delta-chunk", "softmax-chunk"])
def test_chunk_form_memory_grows_linearly(form):
    small, large = temp_bytes(FORMS[form], 4096), temp_bytes(FORMS[form], 16384)
    assert large <= 4.5 * small, f"{form}: {small} -> {large} bytes ({large / small:.2f}x)"


@pytest.mark.parametrize("form", ["linear-parallel", "delta-parallel", "softmax-parallel"])
def test_parallel_form_memory_grows_quadratically(form):
    small, large = temp_bytes(FORMS[form], 2048), temp_bytes(FORMS[form], 8192)
    assert large >= 12 * small, f"{form}: {small} -> {large} bytes ({large / small:.2f}x)"
