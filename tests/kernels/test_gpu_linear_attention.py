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

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import assert_close, log_gates
from xformjax import ops
from xformjax.kernels.gpu import chunk_h, chunk_o
from xformjax.kernels.gpu.linear_attention import linear_attention


@dataclasses.dataclass(frozen=True)
class Case:
    gate: str  # "none" | "head" | "token"
    batch: int = 1
    length: int = 100  # not a multiple of the chunk
    heads: int = 2
    key_dim: int = 20  # K ≠ V, neither a power of two
    value_dim: int = 12
    dtype: str = "float32"
    initial_state: bool = True
    chunk_size: int = 64

    @property
    def name(self) -> str:
        return (
            f"{self.gate}-B{self.batch}T{self.length}H{self.heads}K{self.key_dim}V{self.value_dim}"
            f"-C{self.chunk_size}-{self.dtype}" + ("-h0" if self.initial_state else "")
        )


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
    shape = (case.batch, case.length, case.heads)
    dtype = jnp.dtype(case.dtype)
    inputs = {
        "q": jnp.asarray(rng.standard_normal(shape + (case.key_dim,)), dtype),
        "k": jnp.asarray(rng.standard_normal(shape + (case.key_dim,)), dtype),
        "v": jnp.asarray(rng.standard_normal(shape + (case.value_dim,)), dtype),
    }
    if case.gate == "head":
        inputs["g"] = jnp.asarray(log_gates(rng, (case.heads,), "weak"), jnp.float32)
    if case.gate == "token":
        inputs["g"] = jnp.asarray(log_gates(rng, shape, "strong"), jnp.float32)
    if case.initial_state:
        inputs["initial_state"] = jnp.asarray(
            rng.standard_normal((case.batch, case.heads, case.key_dim, case.value_dim)), jnp.float32
        )
    return inputs


def kernel_fn(case: Case):
    scale = case.key_dim**-0.5

    def run(q, k, v, g=None, initial_state=None):
        return linear_attention(
            q, k, v, g, initial_state, scale=scale, interpret=True, chunk_size=case.chunk_size
        )

    return run


def xla_fn(case: Case):
    def run(q, k, v, g=None, initial_state=None):
        return ops.linear_attention(
            q,
            k,
            v,
            g=g,
            initial_state=initial_state,
            scale=case.key_dim**-0.5,
            output_final_state=True,
            backend="xla",
        )

    return run


def value_and_grads(fn, case: Case, inputs: dict):
    """``((o, final), grads)`` of a random-weighted loss of ``(o, final)``, under one jit."""
    names = list(inputs)
    rng = np.random.default_rng(1)
    weights = jnp.asarray(
        rng.standard_normal((case.batch, case.length, case.heads, case.value_dim)), jnp.float32
    )
    state_weights = jnp.asarray(
        rng.standard_normal((case.batch, case.heads, case.key_dim, case.value_dim)), jnp.float32
    )

    def loss(*arrays):
        o, final = fn(**dict(zip(names, arrays)))
        value = jnp.sum(o.astype(jnp.float32) * weights) + jnp.sum(final * state_weights)
        return value, (o, final)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    grads, outputs = grad(*[inputs[n] for n in names])
    return outputs, dict(zip(names, grads))


def check_case(case: Case, inputs: dict) -> None:
    (o, final), grads = value_and_grads(kernel_fn(case), case, inputs)
    (o_ref, final_ref), grads_ref = value_and_grads(xla_fn(case), case, inputs)
    tol = 1e-5 if case.dtype == "float32" else 2e-2
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    assert final.dtype == jnp.float32 and final.shape == final_ref.shape
    assert_close(o.astype(jnp.float32), o_ref.astype(jnp.float32), tol, "output")
    assert_close(final, final_ref, tol, "final state")
    for name, grad in grads.items():
        grad_ref = grads_ref[name]
        assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape, name
        # dg of a per-head g [H] sums B·T per-token cotangents that largely cancel
        # (float32 rounding of either side alone reaches ~3e-5 against float64)
        grad_tol = 1e-4 if name == "g" and case.gate == "head" and tol < 1e-4 else tol
        assert_close(grad.astype(jnp.float32), grad_ref.astype(jnp.float32), grad_tol, f"d{name}")


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
    (o, final), grads = value_and_grads(kernel_fn(case), case, inputs)
    (o_ref, final_ref), grads_ref = value_and_grads(xla_fn(case), case, inputs)
    for x in (o, final, *grads.values()):
        assert np.all(np.isfinite(np.asarray(x)))
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(final, final_ref, 1e-5, "final state")
    for name in ("q", "k", "v", "initial_state"):
        assert_close(grads[name], grads_ref[name], 1e-5, f"d{name}")
    # the exact dg is ~1e-9 here (every decay factor is ≤ e^{−20}), below the float32
    # cancellation noise of O(1) terms that either implementation leaves: bound it instead
    assert float(jnp.max(jnp.abs(grads["g"]))) < 1e-3


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
