"""Strong gates in float32: the chunk forms as accurate as the recurrent form.

A reset gate (log decay −1e4) among weak ones used to cost the chunk forms their
precision: inside a chunk the decays are ``exp(b_i − b_j)`` of prefix sums, and
after −1e4 both ends sit near −1e4 where float32 spacing is 1e-3 (relative error
4e-4 at −1e4, against 1e-7 for the recurrent form). Under a strong uniform decay
the gate gradient, summed as ``Σ_{u ≥ t} ∂L/∂b_u``, was rounding noise (relative
error 6e+1 for GLA at −20 per token). Both are checked here against the float64
recurrence, forward and every gradient, in every chunk form: linear attention and
the delta rule with a per-token ``g``, a per-channel ``gk`` (GLA, KDA) and a
per-head constant ``g``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops import reference
from tests.ops.helpers import as_jax, relative_error
from xformjax import ops
from xformjax.ops.common.chunk_algebra import LogDecay, log_decays

B, T, H, K, V, CHUNK = 1, 80, 2, 8, 6, 32  # 3 chunks, the last one padded
RESET = -1e4
#: Two resets in the middle of chunk 1 (tokens 32..63), one in chunk 0.
RESETS = (13, 40, 52)
#: The recurrent form reaches 1e-7..3e-7 on these inputs; before the fix the chunk
#: forms were at 1e-4..4e-4 (resets) and 1e+0..6e+1 (uniform decay, gate gradients).
TOL = 2e-6


def _inputs(family: str, kind: str, case: str) -> dict:
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    inputs = {
        "q": unit(rng.standard_normal((B, T, H, K))),
        "k": unit(rng.standard_normal((B, T, H, K))),
        "v": rng.standard_normal((B, T, H, V)),
        "initial_state": rng.standard_normal((B, H, K, V)),
    }
    if family == "delta_rule":
        inputs["beta"] = rng.uniform(0.1, 1.9, (B, T, H))
    if kind == "head":  # a constant per head: reset every step, or a strong decay
        inputs["g"] = np.array([RESET, -20.0])
        return inputs
    shape = (B, T, H) if kind == "token" else (B, T, H, K)
    if case == "uniform":
        gate = np.full(shape, -20.0)
    else:
        gate = np.log(rng.uniform(0.9, 0.9999, shape))
        for position in RESETS:
            if kind == "token":
                gate[:, position] = RESET
            else:  # every other channel, all channels at the last reset
                gate[:, position, :, :: 1 if position == RESETS[-1] else 2] = RESET
    inputs["g" if kind == "token" else "gk"] = gate
    return inputs


#: LLVM at -O0: it halves the compile time (7 s to 3.5 s CPU for the delta rule's
#: per-channel form), which is all these tests spend; float semantics are the same
#: (XLA uses no fast-math either way), and the TwoSum under the default pipeline is
#: checked by ``test_log_decays_keep_the_weak_gates_after_a_reset``.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _chunk_vjp(family: str):
    """One jitted forward + VJP per family (the gate kind only changes the input tree)."""
    op = ops.linear_attention if family == "linear_attention" else ops.delta_rule

    def run(floats):
        return op(**floats, mode="chunk", chunk_size=CHUNK, output_final_state=True, backend="xla")

    @functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
    def forward_and_backward(floats, cotangents):
        outputs, pullback = jax.vjp(run, floats)
        return outputs, pullback(cotangents)[0]

    return forward_and_backward


def _errors(family: str, kind: str, case: str) -> dict[str, float]:
    inputs = _inputs(family, kind, case)
    rng = np.random.default_rng(1)
    d_o, d_final = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))
    if family == "linear_attention":
        o_ref, final_ref, grads_ref = reference.linear_attention(**inputs, d_o=d_o, d_final=d_final)
    else:
        o_ref, final_ref, grads_ref = reference.delta_product(**inputs, d_o=d_o, d_final=d_final)
    (o, final), grads = _chunk_vjp(family)(
        as_jax(inputs, jnp.float32), as_jax((d_o, d_final), jnp.float32)
    )
    assert o.dtype == jnp.float32
    errors = {"o": relative_error(o, o_ref), "final_state": relative_error(final, final_ref)}
    errors.update({f"d{name}": relative_error(grads[name], grads_ref[name]) for name in inputs})
    return errors


@pytest.mark.parametrize("kind", ["token", "channel", "head"])
@pytest.mark.parametrize("family", ["linear_attention", "delta_rule"])
def test_chunk_form_matches_float64_with_strong_gates(family, kind):
    cases = ["resets"] if kind == "head" else ["resets", "uniform"]
    for case in cases:
        errors = _errors(family, kind, case)
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] <= TOL, f"{case}: {worst} relative error {errors[worst]:.2e}"


def test_log_decays_keep_the_weak_gates_after_a_reset():
    """The compensated prefix sum under jit on this backend: ``hi_i − hi_j + lo_i − lo_j``
    recovers the weak gates between ``j`` and ``i`` after a −1e4 gate (so XLA did not
    re-associate the TwoSum away), ``to_end`` likewise, and the VJP is the exact one."""
    rng = np.random.default_rng(2)
    log_a = np.log(rng.uniform(0.9, 0.9999, (3, 64)))
    log_a[:, 5] = RESET
    log_a[:, 20] = 3 * RESET
    log_a = log_a.astype(np.float32)
    exact = np.cumsum(log_a.astype(np.float64), axis=-1)
    hi, lo, to_end = jax.jit(log_decays, static_argnums=1)(jnp.asarray(log_a), 1)
    hi, lo, to_end = (np.asarray(x, np.float64) for x in (hi, lo, to_end))
    assert np.any(lo != 0.0)
    i, j = np.tril_indices(64, -1)
    after = j >= 20  # both after the two resets: |b| ≈ 4e4, float32 spacing 4e-3
    got = (hi[:, i] - hi[:, j]) + (lo[:, i] - lo[:, j])
    want = exact[:, i] - exact[:, j]
    np.testing.assert_allclose(got[:, after], want[:, after], rtol=1e-6, atol=1e-7)
    plain = np.cumsum(log_a, axis=-1, dtype=np.float32).astype(np.float64)
    assert np.max(np.abs((plain[:, i] - plain[:, j])[:, after] - want[:, after])) > 1e-4
    np.testing.assert_allclose(to_end, exact[:, -1:] - exact, rtol=1e-6, atol=1e-7)

    d_hi, d_to_end = rng.standard_normal((2, 3, 64))
    cotangents = LogDecay(*as_jax((d_hi, np.zeros_like(d_hi), d_to_end), jnp.float32))
    pull = jax.jit(lambda x, d: jax.vjp(lambda y: log_decays(y, 1), x)[1](d)[0])
    d_log_a = pull(jnp.asarray(log_a), cotangents)
    # b_i holds log_a_s for s ≤ i; to_end_i for s > i.
    s, i = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    want = d_hi @ (i >= s).T.astype(float) + d_to_end @ (i < s).T.astype(float)
    np.testing.assert_allclose(np.asarray(d_log_a), want, rtol=1e-5, atol=1e-5)
