"""Strong gates: the kernels stay as accurate as the recurrent form after a −1e4 reset.

A log gate of −1e4 makes every later chunk-local cumulative decay ``b`` about −1e4,
whose float32 ulp (1e-3) used to swamp the weak gates' differences ``b_i − b_j`` (a
relative error of ~1e-3 in outputs and gradients). The kernels now take ``b`` as a
compensated pair (``kernels/gates.py``). Each kernel family (scalar-gated linear
attention, GLA's per-channel gate, the gated delta rule), under the GPU and the TPU
interpreter, is held to the float64 recurrence (``tests/ops/reference.py``) within
``TOLERANCE`` relative (max-abs error over max-abs value) for the outputs, the final
state and every gradient: the recurrent form's own float32 error here is 1–7e-7.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops import reference
from xformjax import kernels  # pyright: ignore[reportAttributeAccessIssue]
from xformjax.kernels import gates  # pyright: ignore[reportMissingImports]

#: Relative error allowed (the recurrent form: ≤ 7e-7; the plain float32 cumsum: ~1e-3).
TOLERANCE = 1e-6
RESET = -1e4
#: B, T, H, K, V: T = 80 spans two 64-token chunks, the second one padded.
SHAPE = (1, 80, 1, 16, 16)


def _inputs(family: str) -> dict[str, np.ndarray]:
    """float64 inputs with weak gates and −1e4 resets: two in the first chunk (tokens 10
    and 14) and one in the second (token 70; GLA: on every other channel there)."""
    rng = np.random.default_rng(0)
    batch, length, heads, key_dim, value_dim = SHAPE
    tokens = (batch, length, heads)
    k = rng.standard_normal(tokens + (key_dim,))
    inputs = {
        "q": rng.standard_normal(tokens + (key_dim,)),
        "k": k / np.linalg.norm(k, axis=-1, keepdims=True) if family == "delta" else k / 2,
        "v": rng.standard_normal(tokens + (value_dim,)),
        "initial_state": rng.standard_normal((batch, heads, key_dim, value_dim)),
    }
    if family == "gla":
        gk = np.log(rng.uniform(0.9, 0.999, tokens + (key_dim,)))
        gk[:, (10, 14)] = RESET
        gk[:, 70, :, ::2] = RESET
        inputs["gk"] = gk
    else:
        g = np.log(rng.uniform(0.9, 0.999, tokens))
        g[:, (10, 14, 70)] = RESET
        inputs["g"] = g
    if family == "delta":
        inputs["beta"] = rng.uniform(0.2, 1.0, tokens)
    return inputs


def _reference(family: str, inputs: dict, d_out: np.ndarray, d_final: np.ndarray):
    if family == "delta":
        return reference.delta_product(**inputs, d_o=d_out, d_final=d_final)
    return reference.linear_attention(**inputs, d_o=d_out, d_final=d_final)


def _relative(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(
        np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    )


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("family", ["linear", "gla", "delta"])
def test_kernel_after_a_reset_gate_matches_the_float64_recurrence(family, target):
    inputs = _inputs(family)
    rng = np.random.default_rng(1)
    batch, length, heads, key_dim, value_dim = SHAPE
    d_out = rng.standard_normal((batch, length, heads, value_dim))
    d_final = rng.standard_normal((batch, heads, key_dim, value_dim))
    out_ref, final_ref, grads_ref = _reference(family, inputs, d_out, d_final)
    op = kernels.delta_rule if family == "delta" else kernels.linear_attention
    names = list(inputs)

    def loss(*args):
        out, final = op(**dict(zip(names, args)), target=target, interpret=True)
        return jnp.sum(out * d_out) + jnp.sum(final * d_final), (out, final)

    args = [jnp.asarray(x, jnp.float32) for x in inputs.values()]
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
    (_, (out, final)), grads = grad_fn(*args)
    errors = {"o": _relative(out, out_ref), "final_state": _relative(final, final_ref)}
    errors |= {f"d{name}": _relative(grad, grads_ref[name]) for name, grad in zip(names, grads)}
    assert max(errors.values()) < TOLERANCE, errors


def test_compensated_cumsum_is_exact_and_differentiates_as_the_cumsum():
    rng = np.random.default_rng(2)
    x = np.log(rng.uniform(0.9, 0.999, (3, 64))).astype(np.float32)
    x[0, 5] = x[1, 3] = x[1, 40] = RESET
    hi, lo = gates.compensated_cumsum(jnp.asarray(x), 1)
    exact = np.cumsum(x.astype(np.float64), axis=1)
    total = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    assert np.max(np.abs(total - exact)) < 1e-9  # the plain float32 cumsum: ~1e-3
    np.testing.assert_array_equal(np.asarray(hi), exact.astype(np.float32))
    weights = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(gates.compensated_cumsum(x, 1)[0] * weights))(jnp.asarray(x))
    # the reverse cumulative sum of the weights (float32 sums of ≤ 64 terms of size ~1)
    expected = np.cumsum(np.asarray(weights, np.float64)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=0, atol=1e-5)
