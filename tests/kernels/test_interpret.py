"""Every kernel, forward and gradient, equals the XLA chunk form in Pallas interpret mode.

One shared suite for both kernels: a case names the op (``linear_attention``
with each gate kind, ``delta_rule`` with and without a gate), the shape, the
dtype and whether an initial state is given, and runs under the GPU-style
interpreter (``interpret=True``) and the TPU interpreter
(``pltpu.InterpretParams``, which also checks TPU block-shape rules). Outputs,
final states and the gradients of q, k, v, the gates, β and the initial state
are compared with ``ops.*(backend="xla", mode="chunk")`` — itself checked
against float64 numpy recurrences in ``tests/ops``: float32 within 1e-5
relative, bfloat16 within 2e-2.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.gpu_cases import (
    Shape,
    add_state,
    features,
    scalar_gate,
    tolerance,
    value_and_grads,
    xla_reference,
)
from tests.ops.helpers import assert_close, log_gates
from xformjax import kernels, ops


@dataclasses.dataclass(frozen=True)
class Case(Shape):
    op: str  # "linear_attention" | "delta_rule"
    gate: str  # "none" | "head" | "token" | "channel" | "token+channel"
    target: str = "gpu"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.gate}-{self.target}-{self.dims}-{self.dtype}" + (
            "-h0" if self.initial_state else ""
        )


LINEAR_GATES = ("none", "head", "token", "channel", "token+channel")
DELTA_GATES = ("none", "token", "head")
CASES = (
    # every gate kind under the generic interpreter, T=100 (not a multiple of the
    # chunk), K ≠ V; each kernel (scalar gate, per-channel gate, delta rule) under the
    # TPU interpreter too
    [Case("linear_attention", gate) for gate in LINEAR_GATES]
    + [Case("delta_rule", gate) for gate in DELTA_GATES]
    + [
        Case(op, gate, target="tpu")
        for op, gate in (
            ("linear_attention", "token"),
            ("linear_attention", "token+channel"),
            ("delta_rule", "head"),
        )
    ]
    # T shorter than one chunk, B·H > 1, no initial state
    + [
        Case(op, gate, batch=2, length=5, heads=3, key_dim=16, value_dim=33, initial_state=False)
        for op, gate in (
            ("linear_attention", "token"),
            ("linear_attention", "channel"),
            ("delta_rule", "token"),
        )
    ]
    # several chunks (T = 2·64 + 3), B·H > 1
    + [Case("delta_rule", "token", batch=2, length=131, key_dim=8, value_dim=8)]
    # the TPU state kernels' sequential chunk axis over several chunks, and two 128-lane
    # value tiles (V = 136)
    + [
        Case(op, gate, batch=2, length=131, key_dim=8, value_dim=136, target="tpu")
        for op, gate in (("linear_attention", "channel"), ("delta_rule", "none"))
    ]
    # bfloat16 inputs
    + [
        Case(op, gate, dtype="bfloat16", target=target)
        for op, gate in (
            ("linear_attention", "token"),
            ("linear_attention", "channel"),
            ("delta_rule", "token"),
        )
        for target in ("gpu", "tpu")
    ]
)


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    q = features(rng, case, case.key_dim)
    k = features(rng, case, case.key_dim)
    if case.op == "delta_rule":
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    inputs = {
        "q": jnp.asarray(q, dtype),
        "k": jnp.asarray(k, dtype),
        "v": jnp.asarray(features(rng, case, case.value_dim), dtype),
    }
    if case.op == "delta_rule":
        inputs["beta"] = jnp.asarray(rng.uniform(0.05, 1.95, case.tokens), dtype)
    g = scalar_gate(rng, case, "token" if case.gate == "token+channel" else case.gate)
    if g is not None:
        inputs["g"] = g
    if case.gate in ("channel", "token+channel"):
        gk = log_gates(rng, case.tokens + (case.key_dim,), "strong")
        inputs["gk"] = jnp.asarray(gk, jnp.float32)
    return add_state(inputs, rng, case)


def run_both(case: Case, inputs: dict):
    """``((o, final), grads)`` of the kernel and of the XLA chunk form for one loss."""
    kernel_fn = getattr(kernels, case.op)
    kernel = lambda **kw: kernel_fn(**kw, target=case.target, interpret=True)
    return (
        value_and_grads(kernel, case, inputs),
        value_and_grads(xla_reference(case.op), case, inputs),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_xla_chunk_form(case):
    ((o, final), grads), ((o_ref, final_ref), grads_ref) = run_both(case, make_inputs(case))
    tol = tolerance(case)
    assert o.shape == o_ref.shape and final.shape == final_ref.shape
    assert_close(o.astype(jnp.float32), o_ref.astype(jnp.float32), tol, "output")
    assert_close(final, final_ref, tol, "final state")
    for name, grad in grads.items():
        grad_ref = grads_ref[name]
        assert grad.dtype == grad_ref.dtype, name
        assert_close(grad.astype(jnp.float32), grad_ref.astype(jnp.float32), tol, f"d{name}")


X64_CASES = [
    Case(op, gate, length=70, key_dim=16, value_dim=8, target=target)
    for op, gate in (
        ("linear_attention", "token"),
        ("linear_attention", "token+channel"),
        ("delta_rule", "token"),
    )
    for target in ("gpu", "tpu")
]


@pytest.mark.parametrize("case", X64_CASES, ids=lambda c: c.name)
def test_kernels_run_with_x64_enabled(x64, case):
    """Many scientific users switch ``jax_enable_x64`` on: float32 inputs must still run the
    kernels (integer index arithmetic stays int32) and give the float32 answer."""
    ((o, final), grads), ((o_ref, final_ref), grads_ref) = run_both(case, make_inputs(case))
    assert o.dtype == jnp.float32
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(final, final_ref, 1e-5, "final state")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], 1e-5, f"d{name}")


@pytest.mark.optimized
def test_strong_decay_over_a_long_sequence_stays_finite():
    """Gates of −20 per token over 4K tokens: every exponent is masked or ≤ 0."""
    case = Case(
        "linear_attention",
        "token+channel",
        length=4096,
        heads=1,
        key_dim=16,
        value_dim=16,
        initial_state=False,
    )
    inputs = make_inputs(case)
    inputs["g"] = jnp.full(inputs["g"].shape, -20.0)
    out, final = kernels.linear_attention(**inputs, target="gpu", interpret=True)
    ref, _ref_final = ops.linear_attention(**inputs, output_final_state=True, backend="xla")
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))
    assert_close(out, ref, 1e-5, "output")
    delta = Case(
        "delta_rule", "token", length=4096, heads=1, key_dim=16, value_dim=16, initial_state=False
    )
    inputs = make_inputs(delta)
    inputs["g"] = jnp.full(inputs["g"].shape, -20.0)
    inputs["beta"] = jnp.full(inputs["beta"].shape, 1.99)
    out, _ = kernels.delta_rule(**inputs, target="gpu", interpret=True)
    ref, _ = ops.delta_rule(**inputs, backend="xla")
    assert_close(out, ref, 1e-5, "delta-rule output")


def test_in_kernel_triangular_inverse():
    """``unit_lower_inverse`` (16×16 substitution + series) inverts I + A for C = 16..128."""
    from xformjax.kernels.chunk_math import unit_lower_inverse

    rng = np.random.default_rng(3)
    for size in (16, 48, 64, 128):
        a = np.tril(rng.standard_normal((size, size)) * 0.3, -1).astype(np.float32)
        inverse = np.asarray(unit_lower_inverse(jnp.asarray(a), 16), np.float64)
        exact = np.linalg.inv(np.eye(size) + a.astype(np.float64))
        assert_close(inverse, exact, 1e-5, f"inverse C={size}")
