"""Float32 gradient values of ``ops.neural_memory`` against central finite differences of
the independent float64 numpy reference (``tests/ops/test_neural_memory.py``), for every
element of every input (q, k, v, the four gates, the memory's weights): the Muon
optimiser, Omega windows > 1, the recurrent and the chunk form.

The loss reads the output and the final state (weights and momentum), so the gradient
flows through every path of the op. Norm-wise relative error of the float32 gradient,
worst input of each case (jax 0.10.2, CPU), at the test's seed 20 and the worst over
seeds 20–25 (the momentum cases: over seeds 20, 21, 23 and 20, 23); the finite
differences agree with the float64 op's own gradient to ≤ 2e-10 (momentum) and
≤ 2e-7 (muon: Newton–Schulz is strongly curved):

    case (mode, optimiser, window c, depth)   seed 20   worst seed
    recurrent  momentum  c=2  depth 2         2.7e-7    2.7e-7
    recurrent  muon      c=3  depth 2         1.1e-5    3.1e-5
    chunk      momentum  c=3  depth 1         2.0e-7    5.2e-7
    chunk      muon      c=2  depth 2         1.6e-5    5.5e-5

Muon's errors are ~100× float32's rounding because Newton–Schulz's quintic raises a
small singular value by ~a = 3.4 per step (3.4⁵ ≈ 450 over its 5 steps), and its
derivative with it. The tolerances are 2e-6 (momentum) and 1e-4 (muon). Each case
compiles its own gradient: 2–10 s of CPU per case, ~22 s for the file (it replaced a
check that the gradients were finite and non-zero, ~12 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import relative_error
from tests.ops.test_neural_memory import make_inputs, reference
from xformjax.ops.neural_memory import neural_memory

GATES = ("lr", "momentum", "decay", "gamma")
NAMES = ("q", "k", "v") + GATES
CHUNK_SIZE = 4
STEP = 1e-5  # central differences: truncation ~STEP² and rounding ~1e-16 / STEP

# (mode, optimizer, omega_window, memory depth, tolerance); each case compiles its own
# gradient (2–10 s of CPU), so the momentum chunk case keeps a one-layer memory.
CASES = [
    ("recurrent", "momentum", 2, 2, 2e-6),
    ("recurrent", "muon", 3, 2, 1e-4),
    ("chunk", "momentum", 3, 1, 2e-6),
    ("chunk", "muon", 2, 2, 1e-4),
]


def reference_loss(inputs, memory, readout, *, mode, optimizer, omega):
    """``Σ sin(o) + Σ_l ⟨R_l, W_l⟩ + Σ_l ⟨P_l, m_l⟩`` of the final state, in float64."""
    o, states = reference(
        inputs,
        memory,
        omega_window=omega,
        optimizer=optimizer,
        chunk_size=None if mode == "recurrent" else CHUNK_SIZE,
    )
    weights, moments, _ = states[0, 0]
    total = np.sum(np.sin(o))
    for w, m, (r, p) in zip(weights, moments, readout):  # r, p: [H=1, d_(l-1), d_l]
        total += np.sum(w * r[0]) + np.sum(m * p[0])
    return total


def finite_differences(inputs, memory, readout, **kwargs):
    """∂loss/∂x for every element of every input, by central differences."""

    def loss(inputs, memory):
        return reference_loss(inputs, memory, readout, **kwargs)

    def derivative(array, index, rebuild):
        plus, minus = array.copy(), array.copy()
        plus[index] += STEP
        minus[index] -= STEP
        return (loss(*rebuild(plus)) - loss(*rebuild(minus))) / (2 * STEP)

    grads = {}
    for name in NAMES:
        grad = np.zeros_like(inputs[name])
        for index in np.ndindex(grad.shape):
            grad[index] = derivative(
                inputs[name], index, lambda x, name=name: ({**inputs, name: x}, memory)
            )
        grads[name] = grad
    for layer, w in enumerate(memory):
        grad = np.zeros_like(w)
        for index in np.ndindex(w.shape):

            def rebuild(x, layer=layer):
                return inputs, [x if i == layer else u for i, u in enumerate(memory)]

            grad[index] = derivative(w, index, rebuild)
        grads[f"memory[{layer}]"] = grad
    return grads


def float32_gradients(inputs, memory, readout, *, mode, optimizer, omega):
    def loss(x, weights):
        o, state = neural_memory(
            x["q"],
            x["k"],
            x["v"],
            x["lr"],
            x["momentum"],
            x["decay"],
            weights,
            omega_weights=x["gamma"],
            omega_window=omega,
            optimizer=optimizer,
            mode=mode,
            chunk_size=CHUNK_SIZE,
            output_final_state=True,
        )
        assert state is not None
        total = jnp.sum(jnp.sin(o))
        for layer, (r, p) in enumerate(readout):
            total += jnp.sum(state[f"weight_{layer}"][0] * r.astype(np.float32))
            total += jnp.sum(state[f"momentum_{layer}"][0] * p.astype(np.float32))
        return total

    x = {name: jnp.asarray(inputs[name], jnp.float32) for name in NAMES}
    weights = [jnp.asarray(w, jnp.float32) for w in memory]
    grads, grads_memory = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, weights)
    out = dict(grads)
    out.update({f"memory[{layer}]": g for layer, g in enumerate(grads_memory)})
    return out


@pytest.mark.parametrize("mode,optimizer,omega,depth,tolerance", CASES)
def test_float32_gradients_match_float64_finite_differences(
    mode, optimizer, omega, depth, tolerance
):
    inputs, memory = make_inputs(batch=1, length=9, heads=1, depth=depth, seed=20)
    rng = np.random.default_rng(21)
    readout = [(rng.standard_normal(w.shape), rng.standard_normal(w.shape)) for w in memory]
    kwargs = dict(mode=mode, optimizer=optimizer, omega=omega)
    expected = finite_differences(inputs, memory, readout, **kwargs)
    actual = float32_gradients(inputs, memory, readout, **kwargs)
    assert set(actual) == set(expected)
    errors = {}
    for name, grad in actual.items():
        assert grad.dtype == jnp.float32, name
        errors[name] = relative_error(grad, expected[name])
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= tolerance, (worst, errors)
