"""``ops.diagonal_recurrence`` against a float64 numpy recurrence with a hand-written
backward pass: every form, forward and gradients, signed transitions, awkward shapes,
initial/final states and packed sequences."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import as_jax, assert_close, vjp_of
from xformjax import ops

MODES = ("parallel", "chunk", "recurrent")


def reference(a, b, h0, d_h, d_final):
    """Token by token: ``h_t = a_t h_{t-1} + b_t``, per sequence (a, b ``[T, H, D]``,
    h0 ``[H, D]``). Returns ``h``, ``h_T`` and the gradients of ``a, b, h0`` for the
    cotangents ``d_h`` of every ``h_t`` and ``d_final`` of ``h_T``:
    ``g_t = d_h_t + a_{t+1} g_{t+1}`` (``g_T`` adds ``d_final``),
    ``∂a_t = g_t h_{t-1}``, ``∂b_t = g_t``, ``∂h0 = a_1 g_1``."""
    length = a.shape[0]
    hs, h = np.zeros_like(b), h0.copy()
    for t in range(length):
        h = a[t] * h + b[t]
        hs[t] = h
    grad_a, grad_b = np.zeros_like(a), np.zeros_like(b)
    g = d_final.copy()
    for t in reversed(range(length)):
        g = g + d_h[t]
        previous = hs[t - 1] if t else h0
        grad_a[t], grad_b[t] = g * previous, g
        g = a[t] * g
    return hs, h, (grad_a, grad_b, g)


def reference_batch(a, b, h0, d_h, d_final, cu_seqlens=None):
    """:func:`reference` over batch rows, or over the packed sequences of row 0."""
    hs, grad_a, grad_b = (np.zeros_like(b) for _ in range(3))
    finals, grad_h0 = np.zeros_like(h0), np.zeros_like(h0)
    spans = (
        [(i, 0, a.shape[1]) for i in range(a.shape[0])]
        if cu_seqlens is None
        else [(0, s, e) for s, e in itertools.pairwise(cu_seqlens)]
    )
    for n, (row, start, end) in enumerate(spans):
        span = slice(start, end)
        out = reference(a[row, span], b[row, span], h0[n], d_h[row, span], d_final[n])
        hs[row, span], finals[n] = out[0], out[1]
        grad_a[row, span], grad_b[row, span], grad_h0[n] = out[2]
    return hs, finals, (grad_a, grad_b, grad_h0)


def inputs(rng, batch, length, heads, dim, states, negative=True):
    low = -1.0 if negative else 0.0
    return (
        rng.uniform(low, 1.0, (batch, length, heads, dim)),
        rng.standard_normal((batch, length, heads, dim)),
        rng.standard_normal((states, heads, dim)),
    )


def check(
    mode,
    batch,
    length,
    heads,
    dim,
    chunk_size,
    *,
    dtype,
    tol,
    cu_seqlens=None,
    negative=True,
    seed=0,
):
    rng = np.random.default_rng(seed)
    states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    a, b, h0 = inputs(rng, batch, length, heads, dim, states, negative)
    d_h, d_final = rng.standard_normal(b.shape), rng.standard_normal(h0.shape)
    expected_h, expected_final, expected_grads = reference_batch(a, b, h0, d_h, d_final, cu_seqlens)
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32)

    def run(a, b, h0):
        return ops.diagonal_recurrence(
            a,
            b,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            mode=mode,
            chunk_size=chunk_size,
        )

    (h, final), grads = vjp_of(run, as_jax((a, b, h0), dtype), as_jax((d_h, d_final), dtype))
    assert h.dtype == jnp.promote_types(dtype, jnp.float32)
    assert_close(h, expected_h, tol, f"{mode} h")
    assert_close(final, expected_final, tol, f"{mode} final state")
    for name, got, want in zip(("a", "b", "initial_state"), grads, expected_grads):
        assert_close(got, want, tol, f"{mode} d{name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "batch,length,heads,dim,chunk_size",
    [
        (2, 1, 1, 3, 16),  # a single token
        (1, 37, 2, 5, 16),  # T not a multiple of the chunk, odd D
        (3, 64, 3, 1, 8),  # T a multiple of the chunk, D = 1
    ],
)
def test_forms_match_the_float64_reference(x64, mode, batch, length, heads, dim, chunk_size):
    check(mode, batch, length, heads, dim, chunk_size, dtype=jnp.float64, tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_float32_accumulation(mode):
    check(mode, 2, 45, 2, 4, 16, dtype=jnp.float32, tol=2e-5, negative=False, seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_packed_sequences_start_from_their_own_state(x64, mode):
    # an empty sequence in the middle keeps its initial state as its final state
    check(mode, 1, 29, 2, 3, 8, dtype=jnp.float64, tol=1e-12, cu_seqlens=(0, 5, 5, 20, 29))


def test_bfloat16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(2)
    a, b, _ = inputs(rng, 1, 50, 1, 4, 1)
    h, _ = ops.diagonal_recurrence(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    assert h.dtype == jnp.float32
    expected = reference(
        np.asarray(jnp.asarray(a[0], jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(b[0], jnp.bfloat16), np.float64),
        np.zeros((1, 4)),
        np.zeros((50, 1, 4)),
        np.zeros((1, 4)),
    )[0]
    assert_close(h[0], expected, 1e-5, "bf16 inputs")


def test_long_sequence_with_sign_flips_stays_finite_and_exact():
    # 64K tokens of a = ±1 (parity-like sign flips) and strong decay: products of
    # |a| ≤ 1 never overflow; a = ±1 keeps |h| exactly at its start
    length = 1 << 16
    rng = np.random.default_rng(3)
    signs = rng.choice([-1.0, 1.0], (1, length, 1, 1))
    a = np.concatenate([signs, np.full((1, length, 1, 1), 1e-3)], -1)
    b = np.zeros((1, length, 1, 2))
    h0 = np.ones((1, 1, 2))
    h, final = ops.diagonal_recurrence(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(b, jnp.float32),
        initial_state=jnp.asarray(h0, jnp.float32),
        output_final_state=True,
        chunk_size=256,
    )
    assert np.all(np.isfinite(np.asarray(h)))
    np.testing.assert_array_equal(np.asarray(h[0, :, 0, 0]), np.cumprod(signs[0, :, 0, 0]))
    assert float(final[0, 0, 1]) == 0.0


def test_bad_input_is_rejected_with_the_shapes():
    a = jnp.zeros((1, 4, 2, 3))
    with pytest.raises(ValueError, match="same shape"):
        ops.diagonal_recurrence(a, jnp.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="initial_state"):
        ops.diagonal_recurrence(a, a, initial_state=jnp.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="mode"):
        ops.diagonal_recurrence(a, a, mode="scan")
    with pytest.raises(ValueError, match="rank 4"):
        ops.diagonal_recurrence(a[0], a[0])
    with pytest.raises(ValueError, match="floating"):
        ops.diagonal_recurrence(a.astype(jnp.int32), a)


def test_forms_agree_under_jit_for_random_transitions():
    rng = np.random.default_rng(4)
    a, b, h0 = (jnp.asarray(x, jnp.float32) for x in inputs(rng, 2, 100, 2, 3, 2))
    outs = [
        jax.jit(
            lambda a, b, h0, m=m: ops.diagonal_recurrence(
                a, b, initial_state=h0, mode=m, chunk_size=32
            )[0]
        )(a, b, h0)
        for m in MODES
    ]
    for out in outs[1:]:
        assert_close(out, outs[0], 1e-5, "forms")
