"""Small helpers shared by the op tests: errors, random inputs, vjp plumbing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(actual, expected) -> float:
    """Norm-wise relative error ``‖actual − expected‖ / ‖expected‖`` in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "non-finite values"
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def log_gates(rng: np.random.Generator, shape, strength: str) -> np.ndarray:
    """Natural-log decays: ``weak`` keeps a in [0.9, 1), ``strong`` in [1e-3, 0.5]."""
    low, high = (0.9, 0.9999) if strength == "weak" else (1e-3, 0.5)
    return np.log(rng.uniform(low, high, shape))


@dataclasses.dataclass(frozen=True)
class StateCase:
    """Shapes and options of one recurrent-state op test case."""

    batch: int
    length: int
    heads: int
    key_dim: int
    value_dim: int
    chunk_size: int
    strength: str = "weak"
    with_initial_state: bool = True
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def num_states(self) -> int:
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1


MODES = ("parallel", "chunk", "recurrent")
GATES = ("none", "head", "token", "channel", "token+channel")


def case_gate_grid(cases: dict, every_gate: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(case, gate)`` pairs for the float64 reference matrix: every gate kind on the
    cases named in ``every_gate`` (odd sizes, packed sequences: where a gate's shape
    handling can go wrong), the ungated and the richest gate (``token+channel``) on the
    others. The full product costs a compile per pair for little more coverage: the
    gate code paths do not depend on the other cases' sizes."""
    missing = set(every_gate) - set(cases)
    if missing:
        raise ValueError(f"unknown cases {sorted(missing)}")
    return [
        (case, gate)
        for case in cases
        for gate in (GATES if case in every_gate else ("none", "token+channel"))
    ]


def gate_inputs(
    rng: np.random.Generator, gate: str, shape: tuple[int, int, int], key_dim: int, strength: str
) -> dict:
    """``g`` / ``gk`` for a gate kind of :data:`GATES`; ``shape`` is ``(B, T, H)``."""
    inputs = {}
    if gate == "head":
        inputs["g"] = log_gates(rng, (shape[2],), strength)
    if gate in ("token", "token+channel"):
        inputs["g"] = log_gates(rng, shape, strength)
    if gate in ("channel", "token+channel"):
        inputs["gk"] = log_gates(rng, shape + (key_dim,), strength)
    return inputs


def vjp_of(fn, primals, cotangents):
    """Outputs of ``fn(*primals)`` and the gradients for the given output cotangents,
    computed under one ``jax.jit`` (eager dispatch of every primitive is ~10× slower)."""

    @jax.jit
    def forward_and_backward(primals, cotangents):
        outputs, pullback = jax.vjp(fn, *primals)
        return outputs, pullback(cotangents)

    return forward_and_backward(primals, cotangents)


def as_jax(tree, dtype=None):
    return jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if dtype is not None else jnp.asarray(x), tree
    )


def check_state_op(
    run, reference_fn, inputs: dict, case: StateCase, dtype, tol: float, width: int, seed: int = 0
) -> None:
    """Compare ``run(floats) -> (o, final)`` with a float64 reference: outputs, final
    states and the gradient of every input, for random output cotangents.

    ``reference_fn(d_o=, d_final=)`` returns ``(o, final, grads)``; ``width`` is the
    state's value width.
    """
    rng = np.random.default_rng(seed + 1)
    d_o = rng.standard_normal((case.batch, case.length, case.heads, case.value_dim))
    d_final = rng.standard_normal((case.num_states, case.heads, case.key_dim, width))
    o_ref, final_ref, grads_ref = reference_fn(d_o=d_o, d_final=d_final)
    (o, final), (grads,) = vjp_of(run, (as_jax(inputs, dtype),), as_jax((d_o, d_final), dtype))
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert_close(o, o_ref, tol, "o")
    assert_close(final, final_ref, tol, "final_state")
    for name in inputs:
        assert_close(grads[name], grads_ref[name], tol, f"d{name}")
