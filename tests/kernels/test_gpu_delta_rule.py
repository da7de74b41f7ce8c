"""The chunk-parallel GPU kernels of the gated delta rule (``kernels/gpu``).

Numerics in Pallas interpret mode: outputs, final states and the gradients of
``q, k, v, β, g`` and the initial state of ``kernels.gpu.delta_rule`` equal
``ops.delta_rule(..., backend="xla")`` (itself checked against float64 numpy in
``tests/ops``), keys L2-normalised and ``β`` uniform in ``(0.05, 1.95)``:
float32 within 1e-5 relative, bfloat16 within 2e-2. The triangular inverse needs
no looser bound: its diagonal blocks are solved by exact float32 substitution and
merged by IEEE float32 products (``test_inverse``), and in interpret mode every
other product is float32 too. One case table covers every gate kind (none,
``g [H]``, ``g [B, T, H]``), ``T`` not a multiple of the chunk (and shorter than
it), ``K ≠ V`` not powers of two, ``B·H > 1``, several ``K``/``V`` tiles per
kernel and the state kernels' row slices, with and without an initial state.
Also: x64 mode and strong decay over a long sequence. That every kernel fits an
H100 is ``test_sm90_gate.py``'s.
"""

from __future__ import annotations

import dataclasses

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
from tests.ops.helpers import assert_close, log_gates
from xformjax.kernels.gpu import delta_h, wy
from xformjax.kernels.gpu.delta_rule import delta_rule

CASES = [
    # every gate kind, T = 100, K ≠ V (g [B, T, H] here in bfloat16, below, and in float32
    # in every other case)
    *(Case(gate) for gate in ("none", "head")),
    # T shorter than one chunk, B·H > 1, no initial state
    Case("token", batch=2, length=5, heads=3, key_dim=16, value_dim=33, initial_state=False),
    # several chunks (T = 4·32 + 3) of 32 tokens (two 16-row inverse blocks), B·H > 1
    Case("token", batch=2, length=131, heads=2, key_dim=8, value_dim=8, chunk_size=32),
    # several K and V tiles in every loop (K = 128: two of 64; V = 96 → 128), and a float32
    # key row of 512 bytes: the state kernels walk each chunk in row slices
    Case("head", length=70, heads=1, key_dim=128, value_dim=96),
    # bfloat16 inputs
    Case("token", dtype="bfloat16"),
    Case("head", dtype="bfloat16", key_dim=64, value_dim=64, initial_state=False),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    k = features(rng, case, case.key_dim)
    inputs = {
        "q": jnp.asarray(features(rng, case, case.key_dim), dtype),
        "k": jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype),
        "v": jnp.asarray(features(rng, case, case.value_dim), dtype),
        "beta": jnp.asarray(rng.uniform(0.05, 1.95, case.tokens), dtype),
    }
    return add_gate_and_state(inputs, rng, case, case.gate)


def kernel_fn(case: Case):
    scale = case.key_dim**-0.5

    def run(q, k, v, beta, g=None, initial_state=None):
        return delta_rule(
            q,
            k,
            v,
            beta,
            g,
            initial_state,
            scale=scale,
            interpret=True,
            chunk_size=case.chunk_size,
        )

    return run


def check_case(case: Case, inputs: dict) -> None:
    result, reference = kernel_and_reference(kernel_fn(case), "delta_rule", case, inputs)
    assert_matches(case, result, reference, per_head_gate=case.gate == "head")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_xla_chunk_form(case):
    check_case(case, make_inputs(case))


@pytest.mark.float64
def test_x64_mode(x64):
    """float32 inputs with ``jax_enable_x64`` on: every loop bound and index stays int32
    (chunks of 16: one inverse block, no merges)."""
    case = Case("token", length=40, key_dim=20, value_dim=12, chunk_size=16)
    inputs = make_inputs(case)
    assert inputs["q"].dtype == jnp.float32
    check_case(case, inputs)


def test_strong_decay_over_a_long_sequence_stays_finite():
    """Gates of −20 per token over 1K tokens: every exponent is masked or ≤ 0."""
    case = Case("token", length=1024, heads=1, key_dim=16, value_dim=16)
    inputs = make_inputs(case)
    inputs["g"] = jnp.full(inputs["g"].shape, -20.0)
    result, reference = kernel_and_reference(kernel_fn(case), "delta_rule", case, inputs)
    assert_strong_decay(result, reference, exact=("q", "k", "v", "beta", "initial_state"))


def test_inverse():
    """``wy.inverse`` solves ``(I + A) T = I`` per chunk to float32 rounding (float64
    reference), with β near 2 and keys nearly parallel (large ``A``), strong gates."""
    rng = np.random.default_rng(0)
    batch, length, heads, width, chunk = 1, 128, 2, 32, 64
    base = rng.standard_normal(width)
    k = base + 0.3 * rng.standard_normal((batch, length, heads, width))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(1.5, 1.95, (batch, length, heads))
    g = log_gates(rng, (batch, length, heads), "strong")
    b = np.cumsum(g.reshape(batch, length // chunk, chunk, heads), axis=2).reshape(g.shape)
    b32 = jnp.asarray(b, jnp.float32)
    t = wy.inverse(
        jnp.asarray(k, jnp.float32),
        jnp.asarray(beta, jnp.float32),
        (b32, jnp.zeros_like(b32)),  # the gate's compensated pair (hi, lo)
        chunk_size=chunk,
        interpret=True,
    )
    for n in range(length // chunk):
        rows = slice(n * chunk, (n + 1) * chunk)
        for h in range(heads):
            kc, bc = k[0, rows, h], b[0, rows, h]
            a = np.tril(beta[0, rows, h, None] * (kc @ kc.T) * np.exp(bc[:, None] - bc), -1)
            expected = np.linalg.inv(np.eye(chunk) + a)
            assert_close(t[0, rows, h], expected, 1e-6, f"T of chunk {n}, head {h}")


def test_state_row_slices():
    """The state kernels' row-sliced walk (wide key rows) equals the whole-chunk one."""
    rng = np.random.default_rng(0)
    batch, length, heads, key_width, value_width, chunk = 1, 128, 2, 32, 16, 64
    sliced = dataclasses.replace(delta_h.CONFIG, wide_bytes=0)
    assert sliced.slices(key_width, jnp.float32) > 1
    assert delta_h.CONFIG.slices(key_width, jnp.float32) == 1

    def array(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, w = (array(batch, length, heads, key_width) for _ in range(3))
    u, do, dv_local = (array(batch, length, heads, value_width) for _ in range(3))
    b = jnp.asarray(log_gates(rng, (batch, length, heads), "strong"), jnp.float32)
    b = jnp.cumsum(b.reshape(batch, -1, chunk, heads), axis=2).reshape(b.shape)
    b = (b, jnp.zeros_like(b))  # the gate's compensated pair (hi, lo)
    h0, d_final = (array(batch, heads, key_width, value_width) for _ in range(2))
    results = []
    for config in (delta_h.CONFIG, sliced):
        forward = delta_h.forward(k, w, u, b, h0, chunk_size=chunk, config=config, interpret=True)
        backward = delta_h.backward(
            q,
            k,
            w,
            do,
            dv_local,
            b,
            d_final,
            scale=0.5,
            chunk_size=chunk,
            config=config,
            interpret=True,
        )
        results.append(forward + backward)
    for whole, piecewise in zip(*results):
        np.testing.assert_allclose(piecewise, whole, rtol=1e-5, atol=1e-5)
