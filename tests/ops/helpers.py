"""Small helpers shared by the op tests: errors, random inputs, vjp plumbing."""

from __future__ import annotations

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


def vjp_of(fn, primals, cotangents):
    """Outputs of ``fn(*primals)`` and the gradients for the given output cotangents,
    computed under one ``jax.jit`` (eager dispatch of every primitive is ~10× slower)."""

    @jax.jit
    def forward_and_backward(primals, cotangents):
        outputs, pullback = jax.vjp(fn, *primals)
        return outputs, pullback(cotangents)

    return forward_and_backward(primals, cotangents)


def as_jax(tree, dtype=None):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if dtype is not None else jnp.asarray(x),
                        tree)
