"""The chunk-parallel GPU kernels of scalar-gated linear attention (``kernels/gpu``).

Numerics in Pallas interpret mode: outputs, final states and the gradients of
``q, k, v, g`` and the initial state of ``kernels.gpu.linear_attention`` equal
``ops.linear_attention(..., backend="xla")`` (itself checked against float64
numpy in ``tests/ops``): float32 within 1e-5 relative, bfloat16 within 2e-2.
One case table covers every gate kind (none, ``g [H]``, ``g [B, T, H]``), ``T``
not a multiple of the chunk (and shorter than it), ``K ≠ V`` not powers of
two, ``B·H > 1``, several ``K``/``V`` tiles per kernel, with and without an
initial state. Also: x64 mode, strong decay over a long sequence and the state
kernels' contracts. That every kernel fits an H100 is ``test_sm90_gate.py``'s.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.gpu_cases import ScalarGateCase as Case
from tests.kernels.gpu_cases import (
    add_gate_and_state,
    assert_matches,
    assert_strong_decay,
    features,
    kernel_and_reference,
)
from xformjax.kernels.gpu import chunk_h, chunk_o
from xformjax.kernels.gpu.linear_attention import linear_attention

CASES = [
    # every gate kind, T = 100, K ≠ V
    *(Case(gate) for gate in ("none", "head", "token")),
    # T shorter than one chunk, B·H > 1, no initial state
    Case("token", batch=2, length=5, heads=3, key_dim=16, value_dim=33, initial_state=False),
    # several chunks (T = 4·32 + 3), B·H > 1
    Case("token", batch=2, length=131, heads=3, key_dim=12, value_dim=8, chunk_size=32),
    # several K and V tiles in every kernel (K = 128 → 2 tiles of 64; V = 96 → 128)
    Case("token", length=70, heads=1, key_dim=128, value_dim=96, chunk_size=32),
    # bfloat16 inputs
    Case("token", dtype="bfloat16"),
    Case("head", dtype="bfloat16", key_dim=64, value_dim=64, initial_state=False),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    inputs = {
        "q": jnp.asarray(features(rng, case, case.key_dim), dtype),
        "k": jnp.asarray(features(rng, case, case.key_dim), dtype),
        "v": jnp.asarray(features(rng, case, case.value_dim), dtype),
    }
    return add_gate_and_state(inputs, rng, case, case.gate)


def kernel_fn(case: Case):
    scale = case.key_dim**-0.5

    def run(q, k, v, g=None, initial_state=None):
        return linear_attention(
            q, k, v, g, initial_state, scale=scale, interpret=True, chunk_size=case.chunk_size
        )

    return run


def check_case(case: Case, inputs: dict) -> None:
    result, reference = kernel_and_reference(kernel_fn(case), "linear_attention", case, inputs)
    assert_matches(case, result, reference, per_head_gate=case.gate == "head")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_xla_chunk_form(case):
    check_case(case, make_inputs(case))


@pytest.mark.float64
def test_x64_mode(x64):
    """float32 inputs with ``jax_enable_x64`` on: every loop bound and index stays int32."""
    case = Case("token", batch=2, length=70, key_dim=20, value_dim=12, chunk_size=32)
    inputs = make_inputs(case)
    assert inputs["q"].dtype == jnp.float32
    check_case(case, inputs)


def test_strong_decay_over_a_long_sequence_stays_finite():
    """Gates of −20 per token over 2K tokens: every exponent is masked or ≤ 0."""
    case = Case("token", length=2048, heads=1, key_dim=16, value_dim=16)
    inputs = make_inputs(case)
    inputs["g"] = jnp.full(inputs["g"].shape, -20.0)
    result, reference = kernel_and_reference(kernel_fn(case), "linear_attention", case, inputs)
    assert_strong_decay(result, reference, exact=("q", "k", "v", "initial_state"))


def test_state_kernels_contract():
    """``state_forward``'s ``h[:, n]`` enters chunk ``n``; ``state_backward``'s
    ``dh[:, N−1]`` is ``d_final``; no gate and no initial state mean zeros."""
    rng = np.random.default_rng(0)
    batch, length, heads, width, chunk = 1, 48, 2, 16, 16
    k, v, q, do = (
        jnp.asarray(rng.standard_normal((batch, length, heads, width)), jnp.float32)
        for _ in range(4)
    )
    h, final = chunk_h.state_forward(k, v, None, None, chunk_size=chunk, interpret=True)
    expected = np.zeros((batch, heads, width, width))
    for n in range(length // chunk):
        np.testing.assert_allclose(h[:, n], expected, rtol=1e-5, atol=1e-5)
        rows = slice(n * chunk, (n + 1) * chunk)
        expected = expected + np.einsum("bthk,bthv->bhkv", k[:, rows], v[:, rows])
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-5)
    d_final = jnp.asarray(rng.standard_normal((batch, heads, width, width)), jnp.float32)
    dh, d_h0 = chunk_h.state_backward(
        q, do, None, d_final, scale=0.5, chunk_size=chunk, interpret=True
    )
    np.testing.assert_array_equal(dh[:, -1], d_final)
    expected = d_final + 0.5 * np.einsum("bthk,bthv->bhkv", q, do)
    np.testing.assert_allclose(d_h0, expected, rtol=1e-5, atol=1e-5)
    o = chunk_o.output(q, k, v, h, None, scale=0.5, chunk_size=chunk, interpret=True)
    causal = np.tril(np.ones((length, length)))
    scores = np.einsum("bihk,bjhk->bhij", q, k) * causal
    np.testing.assert_allclose(
        o, 0.5 * np.einsum("bhij,bjhv->bihv", scores, v), rtol=1e-4, atol=1e-4
    )
