"""The harness the GPU-kernel tests share: case shapes, random inputs, one loss, one comparison.

A case is a shape (``Shape``: batch, tokens, heads, key and value sizes, dtype,
with or without an initial state) plus what each test file adds (the gate kind,
the chunk, the op). Every file compares a kernel with ``ops.*(backend="xla")``
through ``value_and_grads``: the gradients of a random-weighted loss of
``(o, final_state)`` (weights seeded 1) under one ``jit``. ``assert_matches``
holds them to float32 within 1e-5 relative, bfloat16 within 2e-2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tests.ops.helpers import assert_close, log_gates
from xformjax import ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """The arrays of one case: ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` in ``dtype``."""

    batch: int = 1
    length: int = 100  # not a multiple of the chunk
    heads: int = 2
    key_dim: int = 20  # K ≠ V, neither a power of two
    value_dim: int = 12
    dtype: str = "float32"
    initial_state: bool = True

    @property
    def tokens(self) -> tuple[int, int, int]:
        """``(B, T, H)``."""
        return (self.batch, self.length, self.heads)

    @property
    def dims(self) -> str:
        return f"B{self.batch}T{self.length}H{self.heads}K{self.key_dim}V{self.value_dim}"


@dataclasses.dataclass(frozen=True)
class ScalarGateCase(Shape):
    """A case of the scalar-gated kernels (linear attention, the delta rule)."""

    gate: str  # "none" | "head" | "token"
    chunk_size: int = 64

    @property
    def name(self) -> str:
        return f"{self.gate}-{self.dims}-C{self.chunk_size}-{self.dtype}" + (
            "-h0" if self.initial_state else ""
        )


def features(rng: np.random.Generator, case: Shape, dim: int) -> np.ndarray:
    """Standard normal ``[B, T, H, dim]`` (float64)."""
    return rng.standard_normal(case.tokens + (dim,))


def scalar_gate(rng: np.random.Generator, case: Shape, kind: str) -> jax.Array | None:
    """``g`` of a gate kind: ``"head"`` weak ``[H]``, ``"token"`` strong ``[B, T, H]``
    (float32), else ``None`` (nothing drawn)."""
    if kind == "head":
        return jnp.asarray(log_gates(rng, (case.heads,), "weak"), jnp.float32)
    if kind == "token":
        return jnp.asarray(log_gates(rng, case.tokens, "strong"), jnp.float32)
    return None


def add_gate_and_state(inputs: dict, rng: np.random.Generator, case: Shape, gate: str) -> dict:
    """``inputs`` with ``g`` (``scalar_gate``) and a standard normal float32 initial state
    ``[B, H, K, V]`` where the case has them, drawn in that order."""
    g = scalar_gate(rng, case, gate)
    if g is not None:
        inputs["g"] = g
    return add_state(inputs, rng, case)


def add_state(inputs: dict, rng: np.random.Generator, case: Shape) -> dict:
    """``inputs`` with a standard normal float32 initial state ``[B, H, K, V]`` where the case
    has one."""
    if case.initial_state:
        shape = (case.batch, case.heads, case.key_dim, case.value_dim)
        inputs["initial_state"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return inputs


def xla_reference(op: str, **options) -> Callable:
    """``ops.<op>(**inputs, **options, output_final_state=True, backend="xla")`` as a function
    of the inputs: the reference every kernel is held to."""
    fn = getattr(ops, op)
    return lambda **inputs: fn(**inputs, **options, output_final_state=True, backend="xla")


def value_and_grads(fn: Callable, case: Shape, inputs: dict):
    """``((o, final), grads)``, ``grads`` a dict by input name, of a random-weighted loss of
    ``fn(**inputs) = (o, final)`` under one ``jit``; the loss is taken in ``final``'s dtype
    (float64 for a float64 reference)."""
    names = list(inputs)
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((case.batch, case.length, case.heads, case.value_dim))
    state_weights = rng.standard_normal((case.batch, case.heads, case.key_dim, case.value_dim))

    def loss(*arrays):
        o, final = fn(**dict(zip(names, arrays)))
        dtype = final.dtype
        value = jnp.sum(o.astype(dtype) * jnp.asarray(weights, dtype))
        return value + jnp.sum(final * jnp.asarray(state_weights, dtype)), (o, final)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    grads, outputs = grad(*[inputs[n] for n in names])
    return outputs, dict(zip(names, grads))


def kernel_and_reference(kernel: Callable, op: str, case: ScalarGateCase, inputs: dict):
    """``value_and_grads`` of ``kernel`` and of ``ops.<op>`` (XLA, scale ``K^{−1/2}``)."""
    reference = xla_reference(op, scale=case.key_dim**-0.5)
    return value_and_grads(kernel, case, inputs), value_and_grads(reference, case, inputs)


def tolerance(case: Shape) -> float:
    return 1e-5 if case.dtype == "float32" else 2e-2


def assert_matches(case: Shape, result, reference, *, per_head_gate: bool = False) -> None:
    """``result = ((o, final), grads)`` equals ``reference`` (``value_and_grads`` of the XLA
    form): dtypes and shapes, then values within ``tolerance(case)``.

    ``per_head_gate``: ``g`` is ``[H]``, and its gradient sums B·T per-token cotangents
    that largely cancel (float32 rounding of either side alone reaches ~3e-5 against
    float64): held to 1e-4 where the tolerance is tighter.
    """
    (o, final), grads = result
    (o_ref, final_ref), grads_ref = reference
    tol = tolerance(case)
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    assert final.dtype == jnp.float32 and final.shape == final_ref.shape
    assert_close(o.astype(jnp.float32), o_ref.astype(jnp.float32), tol, "output")
    assert_close(final, final_ref, tol, "final state")
    for name, grad in grads.items():
        grad_ref = grads_ref[name]
        assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape, name
        bound = 1e-4 if per_head_gate and name == "g" and tol < 1e-4 else tol
        assert_close(grad.astype(jnp.float32), grad_ref.astype(jnp.float32), bound, f"d{name}")


def assert_strong_decay(result, reference, exact: tuple[str, ...]) -> None:
    """Under strong decay (gates of −20 per token): everything finite, outputs and the
    gradients named in ``exact`` within 1e-5; the exact ``dg`` is then tiny (every decay
    factor across tokens is ≤ e^{−20}), below the float32 cancellation noise of O(1) terms
    that either implementation leaves, so it is bounded instead."""
    (o, final), grads = result
    (o_ref, final_ref), grads_ref = reference
    for x in (o, final, *grads.values()):
        assert np.all(np.isfinite(np.asarray(x)))
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(final, final_ref, 1e-5, "final state")
    for name in exact:
        assert_close(grads[name], grads_ref[name], 1e-5, f"d{name}")
    assert float(jnp.max(jnp.abs(grads["g"]))) < 1e-3
