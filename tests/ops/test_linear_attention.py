"""``ops.linear_attention``: every form against the float64 token-by-token reference."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops import reference
from tests.ops.helpers import (
    MODES,
    StateCase,
    as_jax,
    assert_close,
    case_gate_grid,
    check_state_op,
    gate_inputs,
    log_gates,
    relative_error,
)
from xformjax import ops

Case = StateCase

CASES = {
    "decode-T1": Case(2, 1, 2, 16, 16, 64),
    "T63-odd-dims": Case(2, 63, 2, 7, 10, 16, strength="strong"),
    "T100-no-init": Case(1, 100, 3, 16, 8, 32, with_initial_state=False),
    "T257": Case(1, 257, 1, 12, 5, 64, strength="strong"),
    "packed-uneven": Case(
        1, 100, 2, 6, 9, 16, strength="strong", cu_seqlens=(0, 1, 38, 38, 64, 100)
    ),
}


def make_inputs(case: Case, gate: str, seed: int = 0, normalize: bool = False):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.length, case.heads)
    inputs = {
        "q": rng.standard_normal(shape + (case.key_dim,)),
        "k": rng.standard_normal(shape + (case.key_dim,)),
        "v": rng.standard_normal(shape + (case.value_dim,)),
    }
    if normalize:  # positive features, as a normalised linear attention would use
        inputs["q"], inputs["k"] = np.abs(inputs["q"]) + 0.1, np.abs(inputs["k"]) + 0.1
    inputs.update(gate_inputs(rng, gate, shape, case.key_dim, case.strength))
    if case.with_initial_state:
        width = case.value_dim + (1 if normalize else 0)
        init = rng.standard_normal((case.num_states, case.heads, case.key_dim, width))
        if normalize:
            init[..., -1] = np.abs(init[..., -1])
        inputs["initial_state"] = init
    return inputs


def run_op(inputs, case: Case, mode: str, normalize: bool = False):
    """Differentiable wrapper: floating inputs in, ``(o, final_state)`` out."""
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)

    def fn(floats):
        return ops.linear_attention(
            **floats,
            cu_seqlens=cu,
            mode=mode,
            chunk_size=case.chunk_size,
            normalize=normalize,
            output_final_state=True,
        )

    return fn


def check_against_reference(
    case: Case, gate: str, mode: str, dtype, tol: float, normalize: bool = False, seed: int = 0
):
    inputs = make_inputs(case, gate, seed, normalize)
    reference_fn = functools.partial(
        reference.linear_attention, **inputs, normalize=normalize, cu_seqlens=case.cu_seqlens
    )
    check_state_op(
        run_op(inputs, case, mode, normalize),
        reference_fn,
        inputs,
        case,
        dtype,
        tol,
        width=case.value_dim + (1 if normalize else 0),
        seed=seed,
    )


@pytest.mark.parametrize(
    "case, gate", case_gate_grid(CASES, ("T63-odd-dims", "packed-uneven")), ids=str
)
@pytest.mark.parametrize("mode", MODES)
def test_float64_matches_reference(x64, mode, gate, case):
    check_against_reference(CASES[case], gate, mode, jnp.float64, 1e-9)


@pytest.mark.parametrize("case", ["T63-odd-dims", "packed-uneven"])
@pytest.mark.parametrize("mode", MODES)
def test_normalized_float64_matches_reference(x64, mode, case):
    check_against_reference(CASES[case], "token+channel", mode, jnp.float64, 1e-9, normalize=True)


@pytest.mark.parametrize("gate", ["head", "token+channel"])
@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_reference(mode, gate):
    check_against_reference(CASES["T257"], gate, mode, jnp.float32, 1e-4)
    check_against_reference(CASES["packed-uneven"], gate, mode, jnp.float32, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs_accumulate_in_float32(mode):
    case = CASES["T100-no-init"]
    inputs = make_inputs(case, "token")
    o_ref, _final_ref, _ = reference.linear_attention(**inputs)
    rounded = {
        name: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for name, x in inputs.items()
    }
    o_rounded, _, _ = reference.linear_attention(**rounded)
    o, final = ops.linear_attention(
        **as_jax(inputs, jnp.bfloat16),
        mode=mode,
        chunk_size=case.chunk_size,
        output_final_state=True,
    )
    assert o.dtype == jnp.bfloat16
    assert final.dtype == jnp.float32
    assert relative_error(o, o_ref) <= 1e-2
    # Accumulation in float32: far closer to the exact result on the rounded
    # inputs than bf16 accumulation (~4e-3 per step) could be.
    assert relative_error(o, o_rounded) <= 5e-3
    assert relative_error(final, reference.linear_attention(**rounded)[1]) <= 1e-5


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_size_changes_only_rounding(x64, chunk_size):
    case = dataclasses.replace(CASES["T257"], chunk_size=chunk_size)
    inputs = as_jax(make_inputs(case, "token+channel"))
    o, final = ops.linear_attention(**inputs, chunk_size=chunk_size, output_final_state=True)
    o_rec, final_rec = ops.linear_attention(**inputs, mode="recurrent", output_final_state=True)
    assert relative_error(o, o_rec) <= 1e-12
    assert relative_error(final, final_rec) <= 1e-12


def test_decoding_continues_a_chunked_prefix(x64):
    """Chunk over a prefix, then recurrent T=1 steps with the returned state."""
    case = CASES["T100-no-init"]
    inputs = make_inputs(case, "token+channel")
    full, _ = ops.linear_attention(**as_jax(inputs), mode="chunk")
    prefix = 90
    head = {n: x[:, :prefix] for n, x in inputs.items()}
    _, state = ops.linear_attention(**as_jax(head), output_final_state=True)
    for t in range(prefix, case.length):
        step = {n: x[:, t : t + 1] for n, x in inputs.items()}
        o_t, state = ops.linear_attention(
            **as_jax(step), initial_state=state, mode="recurrent", output_final_state=True
        )
        assert relative_error(o_t, full[:, t : t + 1]) <= 1e-12


@pytest.mark.parametrize("gate", ["token", "channel"])
@pytest.mark.optimized
def test_64k_tokens_with_strong_gates_stay_finite(gate):
    """log decays near log(1e-3) over 64K tokens: no overflow, chunk == recurrent."""
    rng = np.random.default_rng(3)
    length, heads, dim = 65536, 1, 16
    q, k, v = (
        jnp.asarray(rng.standard_normal((1, length, heads, dim)), jnp.float32) for _ in range(3)
    )
    shape = (1, length, heads) + ((dim,) if gate == "channel" else ())
    log_a = jnp.asarray(np.log(rng.uniform(5e-4, 2e-3, shape)), jnp.float32)
    kwargs = {"g": log_a} if gate == "token" else {"gk": log_a}
    chunked, final = jax.jit(
        lambda: ops.linear_attention(q, k, v, **kwargs, output_final_state=True)
    )()
    assert bool(jnp.all(jnp.isfinite(chunked))) and bool(jnp.all(jnp.isfinite(final)))
    recurrent, final_rec = jax.jit(
        lambda: ops.linear_attention(q, k, v, **kwargs, mode="recurrent", output_final_state=True)
    )()
    assert relative_error(chunked, recurrent) <= 1e-4
    assert relative_error(final, final_rec) <= 1e-4
    grads = jax.jit(
        jax.grad(
            lambda q, la: jnp.sum(
                ops.linear_attention(q, k, v, **({"g": la} if gate == "token" else {"gk": la}))[0]
            ),
            argnums=(0, 1),
        )
    )(q, log_a)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)


def _intermediate_sizes(jaxpr) -> set[int]:
    sizes = set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            sizes.add(int(np.prod(var.aval.shape)))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                sizes |= _intermediate_sizes(inner)
    return sizes


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_per_head_decay_is_never_broadcast_over_batch_and_time(mode):
    """The linear forms keep a ``[H]`` decay as ``[H]`` (or ``[H, C]``), forward and
    backward. (The parallel form builds ``[H, T, T]`` decays by construction.)"""
    batch, length, heads, dim = 3, 160, 5, 7
    x = jnp.ones((batch, length, heads, dim))
    per_step = batch * length * heads

    def sizes(g):
        fn = lambda q, g: ops.linear_attention(q, x, x, g=g, mode=mode, chunk_size=32)[0]
        return _intermediate_sizes(
            jax.make_jaxpr(jax.grad(lambda q, g: fn(q, g).sum(), argnums=(0, 1)))(x, g).jaxpr
        )

    assert per_step not in sizes(jnp.full((heads,), -0.1))
    # The same probe does see the [B, T, H] gate when one is passed: the test can fail.
    assert per_step in sizes(jnp.full((batch, length, heads), -0.1))


def test_reference_gradients_match_finite_differences(x64):
    """The hand-written reference backward is itself checked, on a tiny problem."""
    case = Case(1, 7, 1, 3, 2, 16, strength="strong", cu_seqlens=(0, 3, 7))
    inputs = make_inputs(case, "token+channel", normalize=True)
    rng = np.random.default_rng(9)
    d_o = rng.standard_normal((1, 7, 1, 2))
    d_final = rng.standard_normal((2, 1, 3, 3))

    def loss(values):
        o, final, _ = reference.linear_attention(
            **values, normalize=True, cu_seqlens=case.cu_seqlens
        )
        return np.sum(o * d_o) + np.sum(final * d_final)

    _, _, grads = reference.linear_attention(
        **inputs, normalize=True, cu_seqlens=case.cu_seqlens, d_o=d_o, d_final=d_final
    )
    eps = 1e-6
    for name, value in inputs.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus = {**inputs, name: value.copy()}
            minus = {**inputs, name: value.copy()}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric[index] = (loss(plus) - loss(minus)) / (2 * eps)
        assert_close(grads[name], numeric, 1e-6, f"reference d{name}")


def test_chunk_helpers_match_numpy(x64):
    """The prefix sums and row dots the chunk forms use instead of ``jnp.cumsum`` and
    ``jnp.sum(a * b)`` (faster on XLA:CPU) compute the same sums, along any axis."""
    from xformjax.ops.common.chunk_algebra import cumulative_sum, reverse_cumulative_sum, row_dot

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 37, 5))
    for axis in (0, 2, -1, -2):
        assert_close(
            cumulative_sum(jnp.asarray(x), axis),
            np.cumsum(x, axis),
            1e-12,
            f"cumulative_sum axis={axis}",
        )
        reverse = np.flip(np.cumsum(np.flip(x, axis), axis), axis)
        assert_close(
            reverse_cumulative_sum(jnp.asarray(x), axis),
            reverse,
            1e-12,
            f"reverse_cumulative_sum axis={axis}",
        )
    a, b = rng.standard_normal((2, 3, 37, 5)), rng.standard_normal((1, 3, 1, 5))
    assert_close(row_dot(jnp.asarray(a), jnp.asarray(b)), np.sum(a * b, axis=-1), 1e-12, "row_dot")


@pytest.mark.parametrize("shape", [(2, 3, 64, 5), (1, 2, 48, 7), (2, 8, 3), (1, 37, 4)], ids=str)
@pytest.mark.parametrize("strength", ["weak", "strong"])
def test_channel_gate_scores_match_numpy(x64, shape, strength):
    """The per-channel decayed scores ``A_ij = Σ_k x_ik y_jk e^{b_ik − b_jk}`` (j ≤ i)
    and their hand-written VJP against dense float64 numpy, on chunks that are and are
    not multiples of the 16-row sub-chunk, for two arrays and for one array used twice."""
    from xformjax.ops.common.channel_scores import channel_gate_scores

    rng = np.random.default_rng(1)
    x, y, cotangent = (rng.standard_normal(s) for s in (shape, shape, shape[:-1] + shape[-2:-1]))
    b = np.cumsum(log_gates(rng, shape, strength), axis=-2)
    size = shape[-2]
    lower = np.tril(np.ones((size, size), bool))[..., None]
    with np.errstate(over="ignore"):  # e^{b_i − b_j} above the diagonal, masked next
        decay = np.where(lower, np.exp(b[..., :, None, :] - b[..., None, :, :]), 0.0)
    expected = np.einsum("...ik,...jk,...ijk->...ij", x, y, decay)
    terms = np.einsum("...ij,...ik,...jk,...ijk->...ijk", cotangent, x, y, decay)
    expected_grads = (
        np.einsum("...ij,...jk,...ijk->...ik", cotangent, y, decay),
        np.einsum("...ij,...ik,...ijk->...jk", cotangent, x, decay),
        terms.sum(-2) - terms.sum(-3),
    )  # b_i enters with +, b_j with −

    scores, vjp = jax.vjp(channel_gate_scores, *(jnp.asarray(a) for a in (x, y, b)))
    assert_close(scores, expected, 1e-12, "scores")
    for name, grad, want in zip("xyb", vjp(jnp.asarray(cotangent)), expected_grads):
        assert_close(grad, want, 1e-12, f"d{name}")
    same = jax.grad(lambda z, g: jnp.sum(channel_gate_scores(z, z, g) * cotangent), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(b)
    )
    x_terms = np.einsum("...ij,...ik,...jk,...ijk->...ijk", cotangent, x, x, decay)
    assert_close(
        same[0],
        np.einsum("...ij,...jk,...ijk->...ik", cotangent, x, decay)
        + np.einsum("...ij,...ik,...ijk->...jk", cotangent, x, decay),
        1e-12,
        "dx (y = x)",
    )
    assert_close(same[1], x_terms.sum(-2) - x_terms.sum(-3), 1e-12, "db (y = x)")
