"""``ops.aaren`` (softmax attention of a time-constant query as a prefix scan)
against an independent float64 numpy recurrence with a hand-written backward pass,
and against ``ops.softmax_attention`` with the query repeated at every position."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import as_jax, assert_close, relative_error, vjp_of
from xformjax import ops as xops
from xformjax.ops.aaren import AarenState, aaren

MODES = ("parallel", "chunk", "recurrent")
STATE_FIELDS = ("max", "numerator", "denominator")


# --------------------------------------------------------------------------------------
# the float64 reference (nothing from xformjax)
# --------------------------------------------------------------------------------------


def reference_aaren(q, k, v, *, scale=None, initial_state=None, d_o=None, d_final=None):
    """Token by token, per batch row and head, with ``s_i = scale·q·k_i``::

        m_t = max(m_{t-1}, s_t);  a = exp(m_{t-1} − m_t)  (0 when m_{t-1} = −inf)
        u_t = a·u_{t-1} + exp(s_t − m_t)·v_t;  w_t = a·w_{t-1} + exp(s_t − m_t)
        o_t = u_t / w_t

    ``q`` is ``[H, K]``, ``[B, H, K]`` or ``[B, T, H, K]`` (token i scored by q_i).
    Returns ``(o, (m, u, w), grads)``. With cotangents ``d_o`` ``[B, T, H, V]`` and
    ``d_final = (dm, du, dw)``, ``grads`` holds the gradients of ``q, k, v`` and
    of the initial state's three parts, from the closed forms

        o_t = (u0·e^{m0} + Σ_{i≤t} e^{s_i} v_i) / (w0·e^{m0} + Σ_{i≤t} e^{s_i})
        ∂o_t/∂s_i = p_ti (v_i − o_t),  ∂o_t/∂v_i = p_ti,  p_ti = e^{s_i − m_t} / w_t
        ∂o_t/∂u0 = p0_t,  ∂o_t/∂w0 = −p0_t o_t,  ∂o_t/∂m0 = p0_t (u0 − w0 o_t),
        p0_t = e^{m0 − m_t} / w_t
    and, for the final summary, the direct terms plus ``dm − du·u_T − dw·w_T``
    routed to the score (or m0) that holds the max.
    """
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    q = np.asarray(q, np.float64)
    q_tokens = np.broadcast_to(
        q if q.ndim == 4 else (q[None] if q.ndim == 2 else q)[:, None], k.shape
    )
    if initial_state is None:
        m0 = np.full((batch, heads), -np.inf)
        u0, w0 = np.zeros((batch, heads, value_dim)), np.zeros((batch, heads))
    else:
        m0, u0, w0 = (np.asarray(x, np.float64) for x in initial_state)
    o = np.zeros((batch, length, heads, value_dim))
    final = (
        np.zeros((batch, heads)),
        np.zeros((batch, heads, value_dim)),
        np.zeros((batch, heads)),
    )
    backward = d_o is not None
    grads = {
        "q_tokens": np.zeros(k.shape),
        "k": np.zeros(k.shape),
        "v": np.zeros(v.shape),
        "max": np.zeros(m0.shape),
        "numerator": np.zeros(u0.shape),
        "denominator": np.zeros(w0.shape),
    }
    for b in range(batch):
        for h in range(heads):
            s = scale * np.einsum("tk,tk->t", q_tokens[b, :, h], k[b, :, h])
            m, u, w = m0[b, h], u0[b, h].copy(), w0[b, h]
            ms, ws = np.zeros(length), np.zeros(length)
            for t in range(length):
                m_new = max(m, s[t])
                a = 0.0 if m == -np.inf else np.exp(m - m_new)
                c = np.exp(s[t] - m_new)
                u, w, m = a * u + c * v[b, t, h], a * w + c, m_new
                o[b, t, h], ms[t], ws[t] = u / w, m, w
            final[0][b, h], final[1][b, h], final[2][b, h] = m, u, w
            if not backward:
                continue
            ds, dv = np.zeros(length), np.zeros((length, value_dim))
            dm0 = du0 = dw0 = 0.0
            e0 = (
                (lambda mt: 0.0)
                if m0[b, h] == -np.inf
                else (lambda mt, b=b, h=h: np.exp(m0[b, h] - mt))
            )
            for t in range(length):
                g = d_o[b, t, h]
                p = np.exp(s[: t + 1] - ms[t]) / ws[t]
                ds[: t + 1] += p * ((v[b, : t + 1, h] - o[b, t, h]) @ g)
                dv[: t + 1] += p[:, None] * g
                p0 = e0(ms[t]) / ws[t]
                du0 = du0 + p0 * g
                dw0 -= p0 * (o[b, t, h] @ g)
                dm0 += p0 * ((u0[b, h] - w0[b, h] * o[b, t, h]) @ g)
            dm, du, dw = (np.asarray(x, np.float64)[b, h] for x in d_final)
            e = np.exp(s - m)
            ds += e * (v[b, :, h] @ du + dw)
            dv += e[:, None] * du
            du0 = du0 + e0(m) * du
            dw0 += e0(m) * dw
            dm0 += e0(m) * (du @ u0[b, h] + dw * w0[b, h])
            through_max = dm - du @ u - dw * w
            if m0[b, h] >= s.max():
                dm0 += through_max
            else:
                ds[np.argmax(s)] += through_max
            grads["q_tokens"][b, :, h] = scale * ds[:, None] * k[b, :, h]
            grads["k"][b, :, h] = scale * ds[:, None] * q_tokens[b, :, h]
            grads["v"][b, :, h] = dv
            grads["max"][b, h], grads["numerator"][b, h], grads["denominator"][b, h] = dm0, du0, dw0
    if backward:
        dq = grads.pop("q_tokens")
        grads["q"] = dq if q.ndim == 4 else dq.sum(1) if q.ndim == 3 else dq.sum((0, 1))
    return o, final, grads


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    length: int = 37
    heads: int = 2
    key_dim: int = 8
    value_dim: int = 5
    chunk_size: int = 16
    query: str = "shared"  # "shared" [H, K], "batch" [B, H, K], "token" [B, T, H, K]
    initial: str = "random"  # "random", "empty" (m = −inf) or "none"
    scale: float = 8**-0.5


# Compiling a forward+backward of the scan forms dominates this file's run time, so
# cases are grouped by shape: cases that differ only in values, in the initial state
# (random or empty) or in the scale share one compilation (see forward_and_backward).
CASES = {
    "T1": Case(length=1),
    "T1-batch-query-no-state": Case(length=1, query="batch", initial="none"),
    "T37-C16-token-query": Case(length=37, query="token"),
    "T37-C16-token-query-empty-state-scale50": Case(
        length=37, query="token", initial="empty", scale=50.0
    ),
    "T100-C64-shared-query": Case(length=100, chunk_size=64),
    "T100-C64-shared-query-empty-state-scale50": Case(
        length=100, chunk_size=64, initial="empty", scale=50.0
    ),
}
# float64: every case in chunk and recurrent mode, the parallel form up to T = 37 (at
# T = 100 it is checked in float32, below, which needs its own compilation anyway)
MODE_CASES = [
    (mode, name)
    for mode in MODES
    for name in CASES
    if mode != "parallel" or CASES[name].length <= 37
]
FLOAT32_CASES = {
    "T100-C16-token-query": Case(length=100, query="token"),
    "T100-C16-token-query-empty-state-scale50": Case(
        length=100, query="token", initial="empty", scale=50.0
    ),
}


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.length, case.heads)
    query_shape = {
        "shared": (case.heads, case.key_dim),
        "batch": (case.batch, case.heads, case.key_dim),
        "token": shape + (case.key_dim,),
    }[case.query]
    inputs = {
        "q": rng.standard_normal(query_shape),
        "k": rng.standard_normal(shape + (case.key_dim,)),
        "v": rng.standard_normal(shape + (case.value_dim,)),
    }
    state_shape = (case.batch, case.heads)
    if case.initial == "random":
        w0 = rng.uniform(0.5, 3.0, state_shape)
        inputs["initial_state"] = (
            rng.standard_normal(state_shape),
            w0[..., None] * rng.standard_normal(state_shape + (case.value_dim,)),
            w0,
        )
    elif case.initial == "empty":
        inputs["initial_state"] = (
            np.full(state_shape, -np.inf),
            np.zeros(state_shape + (case.value_dim,)),
            np.zeros(state_shape),
        )
    return inputs


def cotangents(case: Case, seed: int = 1):
    rng = np.random.default_rng(seed)
    d_o = rng.standard_normal((case.batch, case.length, case.heads, case.value_dim))
    d_final = (
        rng.standard_normal((case.batch, case.heads)),
        rng.standard_normal((case.batch, case.heads, case.value_dim)),
        rng.standard_normal((case.batch, case.heads)),
    )
    return d_o, d_final


def forward_and_backward(mode: str, chunk_size: int):
    """A jitted ``(inputs, scale, cotangents) -> (outputs, input gradients)``."""
    return _forward_and_backward(mode, chunk_size if mode == "chunk" else None)


@functools.cache
def _forward_and_backward(mode: str, chunk_size: int | None):
    # the scale is traced so that cases differing only in it share one compilation

    def run(x, scale):
        state = x.get("initial_state")
        o, final = aaren(
            x["q"],
            x["k"],
            x["v"],
            scale=scale,
            initial_state=None if state is None else AarenState(*state),
            output_final_state=True,
            mode=mode,
            chunk_size=chunk_size or 64,
        )
        return o, tuple(final)

    # XLA's backend optimisations halve the compile time of these scans on CPU; the
    # arithmetic is the same (no fast-math either way), and the optimised build is
    # exercised by every other test here and by the layer tests.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def both(x, scale, cotangents):
        outputs, pullback = jax.vjp(lambda x: run(x, scale), x)
        return outputs, pullback(cotangents)[0]

    return both


def check_against_reference(case: Case, mode: str, dtype, tol: float) -> None:
    inputs = make_inputs(case)
    d_o, d_final = cotangents(case)
    o_ref, final_ref, grads_ref = reference_aaren(
        **inputs, scale=case.scale, d_o=d_o, d_final=d_final
    )
    (o, final), grads = forward_and_backward(mode, case.chunk_size)(
        as_jax(inputs, dtype), jnp.asarray(case.scale, dtype), as_jax((d_o, d_final), dtype)
    )
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert_close(o, o_ref, tol, f"{mode} o")
    for name, got, want in zip(STATE_FIELDS, final, final_ref):
        assert got.dtype == dtype
        assert_close(got, want, tol, f"{mode} final {name}")
    for name in ("q", "k", "v"):
        assert_close(grads[name], grads_ref[name], tol, f"{mode} d{name}")
    if "initial_state" in inputs:
        for name, got in zip(STATE_FIELDS, grads["initial_state"]):
            assert_close(got, grads_ref[name], tol, f"{mode} d initial_state.{name}")


def _repeated_query_attention(q, k, v, scale):
    """``ops.softmax_attention`` (causal) with the ``[B, H, K]`` query at every position."""
    repeated = jnp.broadcast_to(q[:, None], k.shape)
    return xops.softmax_attention(repeated, k, v, causal=True, scale=scale, mode="parallel")[0]


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, case", MODE_CASES, ids=[f"{m}-{c}" for m, c in MODE_CASES])
def test_float64_matches_reference(x64, mode, case):
    check_against_reference(CASES[case], mode, jnp.float64, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_float32_with_large_scores_matches_reference(mode):
    """Scores of several hundred (scale 50) in float32: no overflow, no NaN, and the
    outputs, final state and gradients match the float64 reference."""
    case = FLOAT32_CASES["T100-C16-token-query-empty-state-scale50"]
    inputs = make_inputs(case)
    assert np.abs(case.scale * np.einsum("bthk,bthk->bth", inputs["q"], inputs["k"])).max() > 300
    check_against_reference(case, mode, jnp.float32, 1e-5)
    check_against_reference(FLOAT32_CASES["T100-C16-token-query"], mode, jnp.float32, 1e-5)


def test_reference_backward_matches_finite_differences(x64):
    """The hand-written reference backward, checked once by central differences."""
    case = Case(batch=1, length=6, heads=1, key_dim=3, value_dim=2)
    inputs = make_inputs(case, seed=3)
    d_o, d_final = cotangents(case, seed=4)
    _, _, grads = reference_aaren(**inputs, d_o=d_o, d_final=d_final)

    def objective(x):
        o, final, _ = reference_aaren(**x)
        return float(np.sum(o * d_o) + sum(np.sum(f * d) for f, d in zip(final, d_final)))

    def bumped(name, index, delta):
        x = {
            n: (tuple(a.copy() for a in value) if n == "initial_state" else value.copy())
            for n, value in inputs.items()
        }
        if name in STATE_FIELDS:
            x["initial_state"][STATE_FIELDS.index(name)][index] += delta
        else:
            x[name][index] += delta
        return x

    eps = 1e-6
    for name in ("q", "k", "v") + STATE_FIELDS:
        shape = np.shape(grads[name])
        numeric = np.zeros(shape)
        for index in np.ndindex(shape):
            numeric[index] = (
                objective(bumped(name, index, eps)) - objective(bumped(name, index, -eps))
            ) / (2 * eps)
        assert_close(grads[name], numeric, 1e-6, f"reference d{name}")


def _check_equals_softmax_attention(case: Case, modes) -> None:
    """The forms, from an empty initial state, against ``ops.softmax_attention`` with
    the query repeated at every position: outputs and the gradients of q, k, v.

    The attention reference gets a ``[B, H, K]`` query; the op gets it as is
    (``"batch"``), broadcast to ``[B, T, H, K]`` (``"token"``) or, for a
    ``"shared"`` case, the ``[H, K]`` query of every batch row."""
    inputs = as_jax(make_inputs(case), jnp.float64)
    if case.query == "shared":
        query = jnp.broadcast_to(inputs["q"], (case.batch,) + inputs["q"].shape)
    else:
        query = jnp.asarray(make_inputs(dataclasses.replace(case, query="batch"))["q"])
        inputs["q"] = (
            query if case.query == "batch" else jnp.broadcast_to(query[:, None], inputs["k"].shape)
        )
    d_o, d_final = cotangents(case)
    d_final = tuple(np.zeros_like(x) for x in d_final)  # outputs only
    o_ref, ((dq_ref, dk_ref, dv_ref),) = vjp_of(
        lambda x: _repeated_query_attention(*x, case.scale),
        ((query, inputs["k"], inputs["v"]),),
        jnp.asarray(d_o),
    )
    for mode in modes:
        (o, _), grads = forward_and_backward(mode, case.chunk_size)(
            inputs, jnp.asarray(case.scale, jnp.float64), as_jax((d_o, d_final), jnp.float64)
        )
        assert_close(o, o_ref, 1e-12, f"{mode} o")
        # the op's query gradient, summed over the positions / batch rows it was repeated to
        dq = grads["q"].sum(1) if case.query == "token" else grads["q"]
        assert_close(dq, dq_ref.sum(0) if case.query == "shared" else dq_ref, 1e-12, f"{mode} dq")
        assert_close(grads["k"], dk_ref, 1e-12, f"{mode} dk")
        assert_close(grads["v"], dv_ref, 1e-12, f"{mode} dv")


@pytest.mark.parametrize(
    "case",
    [
        "T1-batch-query-no-state",
        "T37-C16-token-query-empty-state-scale50",
        "T100-C64-shared-query-empty-state-scale50",
    ],
)
def test_equals_causal_softmax_attention_with_the_query_repeated(x64, case):
    """ "It must equal causal softmax attention for the same (learned) query", for the
    query given as [B, H, K] (T = 1), broadcast to [B, T, H, K] (T = 37) and as [H, K]
    (T = 100; the parallel form at T = 100 is left to the float32 test)."""
    case = dataclasses.replace(CASES[case], scale=0.7)
    modes = MODES if case.length <= 37 else ("chunk", "recurrent")
    _check_equals_softmax_attention(case, modes)


@pytest.mark.parametrize("mode", MODES)
def test_two_halves_with_the_state_equal_the_whole(x64, mode):
    """The second half, started from the first half's final state, continues the
    sequence: both halves together equal the reference over the whole."""
    case = Case(length=52, query="batch", initial="random")
    inputs = as_jax(make_inputs(case))
    whole, whole_final, _ = reference_aaren(**inputs, scale=case.scale)
    state = AarenState(*inputs.pop("initial_state"))
    run = jax.jit(
        lambda x, s: aaren(
            **x,
            scale=case.scale,
            initial_state=s,
            output_final_state=True,
            mode=mode,
            chunk_size=16,
        )
    )
    halves = [
        {n: x[:, part] if n != "q" else x for n, x in inputs.items()}
        for part in (slice(0, 26), slice(26, None))
    ]
    o1, middle = run(halves[0], state)
    o2, final = run(halves[1], middle)
    assert_close(jnp.concatenate([o1, o2], 1), whole, 1e-12, f"{mode} o")
    for name, got, want in zip(STATE_FIELDS, final, whole_final):
        assert_close(got, want, 1e-12, f"{mode} final {name}")


def test_decoding_token_by_token_continues_a_chunked_prefix(x64):
    case = Case(length=40, query="shared", initial="none")
    inputs = as_jax(make_inputs(case))
    full, _, _ = reference_aaren(**inputs, scale=case.scale)
    prefix = 33
    _, state = jax.jit(
        lambda q, k, v: aaren(q, k, v, scale=case.scale, chunk_size=16, output_final_state=True)
    )(inputs["q"], inputs["k"][:, :prefix], inputs["v"][:, :prefix])
    step = jax.jit(
        lambda k_t, v_t, s: aaren(
            inputs["q"],
            k_t,
            v_t,
            scale=case.scale,
            initial_state=s,
            output_final_state=True,
            mode="recurrent",
        )
    )
    for t in range(prefix, 40):
        o_t, state = step(inputs["k"][:, t : t + 1], inputs["v"][:, t : t + 1], state)
        assert_close(o_t, full[:, t : t + 1], 1e-12, f"decoded token {t}")


@pytest.mark.parametrize("chunk_size", [1, 7, 200])
def test_chunk_size_never_changes_results(x64, chunk_size):
    case = Case(length=100, query="token")
    inputs = as_jax(make_inputs(case))
    o_ref, final_ref, _ = reference_aaren(**inputs, scale=case.scale)
    o, final = jax.jit(
        lambda x: aaren(
            **{**x, "initial_state": AarenState(*x["initial_state"])},
            scale=case.scale,
            output_final_state=True,
            chunk_size=chunk_size,
        )
    )(inputs)
    assert_close(o, o_ref, 1e-12, f"chunk_size={chunk_size} o")
    for name, got, want in zip(STATE_FIELDS, final, final_ref):
        assert_close(got, want, 1e-12, f"chunk_size={chunk_size} final {name}")


def test_dtypes():
    inputs = as_jax(make_inputs(Case(length=20, initial="none")), jnp.bfloat16)
    o, state = jax.jit(lambda x: aaren(**x, output_final_state=True))(inputs)
    assert o.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in state)
    reference, _, _ = reference_aaren(*(np.asarray(inputs[n], np.float64) for n in "qkv"))
    assert_close(o.astype(jnp.float32), reference, 1e-2, "bfloat16")


def test_float64_stays_float64(x64):
    inputs = as_jax(make_inputs(Case(length=5, initial="none")), jnp.float64)
    o, state = aaren(**inputs, output_final_state=True, mode="recurrent")
    assert o.dtype == jnp.float64 and all(x.dtype == jnp.float64 for x in state)


def test_final_state_only_when_asked():
    inputs = as_jax(make_inputs(Case(length=5, initial="none")), jnp.float32)
    assert aaren(**inputs, mode="recurrent")[1] is None


def test_long_float32_chunked_sequence_matches_float64_reference():
    case = Case(batch=1, length=2048, heads=2, query="batch", initial="none", scale=2.0)
    inputs = make_inputs(case)
    o_ref, final_ref, _ = reference_aaren(**inputs, scale=2.0)
    o, final = jax.jit(lambda x: aaren(**x, scale=2.0, output_final_state=True))(
        as_jax(inputs, jnp.float32)
    )
    assert relative_error(o, o_ref) <= 1e-5
    for name, got, want in zip(STATE_FIELDS, final, final_ref):
        assert relative_error(got, want) <= 1e-5, name


B, T, H, K, V = 2, 10, 3, 4, 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(q=jnp.ones((B, T, H))),
            r"`q` must have shape \[B, H, K\] = \(2, 3, 4\).*\(2, 10, 3\)",
        ),
        (dict(q=jnp.ones((K,))), r"`q` must be \[H, K\] or \[B, H, K\].*got shape \(4,\)"),
        (dict(q=jnp.ones((H, K + 1))), r"`q` must have shape \[H, K\] = \(3, 4\).*got \(3, 5\)"),
        (dict(q=jnp.ones((B, T + 1, H, K))), r"`q` must have shape \[B, T, H, K\]"),
        (dict(k=jnp.ones((B, T, H * K))), r"`k` must have rank 4"),
        (dict(v=jnp.ones((B, T + 1, H, V))), r"`v` has shape \(2, 11, 3, 5\).*T of `k`"),
        (dict(v=jnp.ones((B, T, H + 1, V))), r"`v` has shape \(2, 10, 4, 5\).*H of `k`"),
        (dict(k=jnp.ones((B, 0, H, K)), v=jnp.ones((B, 0, H, V))), r"T=0"),
        (dict(k=jnp.ones((B, T, H, K), jnp.int32)), r"`k` must be a floating"),
        (dict(mode="fast"), r"unknown `mode`='fast'"),
        (dict(chunk_size=0), r"`chunk_size` must be a positive int; got 0"),
        (dict(backend="cuda"), r"unknown `backend`='cuda'"),
        (dict(initial_state=jnp.zeros((B, H, V))), r"`initial_state` must be an AarenState"),
        (
            dict(initial_state=(jnp.zeros((B, H)), jnp.zeros((B, H, V + 1)), jnp.zeros((B, H)))),
            r"`initial_state.numerator` must have shape \(2, 3, 5\).*got \(2, 3, 6\)",
        ),
        (
            dict(initial_state=(jnp.zeros((B, H + 1)), jnp.zeros((B, H, V)), jnp.zeros((B, H)))),
            r"`initial_state.max` must have shape \(2, 3\).*got \(2, 4\)",
        ),
    ],
)
def test_bad_input_raises(kwargs, message):
    inputs = {"q": jnp.ones((B, H, K)), "k": jnp.ones((B, T, H, K)), "v": jnp.ones((B, T, H, V))}
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        aaren(**inputs)


@pytest.mark.parametrize("mode", MODES)
def test_segment_ids_restart_the_summary_at_each_document(x64, mode):
    """Row 0 packs documents of 5, 20 and 15 tokens, row 1 of 30 and 10 (chunk 16:
    beginnings inside chunks): the first continues ``initial_state``, the others start
    empty. Outputs, the final state (the last document's) and every gradient equal the
    float64 reference run on each document alone."""
    rows = ((5, 20, 15), (30, 10))
    rng = np.random.default_rng(0)
    batch, length, heads, key_dim, value_dim = 2, 40, 3, 6, 4
    x = {
        "q": rng.standard_normal((heads, key_dim)),
        "k": 3 * rng.standard_normal((batch, length, heads, key_dim)),
        "v": rng.standard_normal((batch, length, heads, value_dim)),
        "initial_state": (
            rng.standard_normal((batch, heads)),
            rng.standard_normal((batch, heads, value_dim)),
            rng.uniform(0.5, 2.0, (batch, heads)),
        ),
    }
    ids = jnp.asarray([np.repeat(np.arange(len(r)) + 7, r) for r in rows], jnp.int32)
    d_o = rng.standard_normal((batch, length, heads, value_dim))
    d_final = tuple(rng.standard_normal(a.shape) for a in x["initial_state"])

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def packed(x, cotangents):
        def run(x):
            o, final = aaren(
                x["q"],
                x["k"],
                x["v"],
                initial_state=AarenState(*x["initial_state"]),
                output_final_state=True,
                mode=mode,
                chunk_size=16,
                segment_ids=ids,
            )
            return o, tuple(final)

        outputs, pullback = jax.vjp(run, x)
        return outputs, pullback(cotangents)[0]

    (o, final), grads = packed(as_jax(x), as_jax((d_o, d_final)))
    dq, dk, dv = np.zeros((heads, key_dim)), np.zeros(x["k"].shape), np.zeros(x["v"].shape)
    for b, lengths in enumerate(rows):
        start = 0
        for index, n in enumerate(lengths):
            part = slice(start, start + n)
            first, last = index == 0, index == len(lengths) - 1
            initial = tuple(a[b : b + 1] for a in x["initial_state"]) if first else None
            d_last = tuple((a if last else np.zeros_like(a))[b : b + 1] for a in d_final)
            o_ref, final_ref, g = reference_aaren(
                x["q"],
                x["k"][b : b + 1, part],
                x["v"][b : b + 1, part],
                initial_state=initial,
                d_o=d_o[b : b + 1, part],
                d_final=d_last,
            )
            assert_close(o[b : b + 1, part], o_ref, 1e-12, f"{mode} o [{b}, {part}]")
            dq += g["q"]
            dk[b : b + 1, part], dv[b : b + 1, part] = g["k"], g["v"]
            if first:
                for name, got in zip(STATE_FIELDS, grads["initial_state"]):
                    assert_close(got[b : b + 1], g[name], 1e-12, f"{mode} d initial {name}")
            if last:
                for name, got, want in zip(STATE_FIELDS, final, final_ref):
                    assert_close(got[b : b + 1], want, 1e-12, f"{mode} final {name}")
            start += n
    for name, want in (("q", dq), ("k", dk), ("v", dv)):
        assert_close(grads[name], want, 1e-12, f"{mode} d{name}")
