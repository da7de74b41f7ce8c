"""Bad input raises ``ValueError`` naming the argument and the shapes it got."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from xformjax import ops

B, T, H, K, V = 2, 10, 3, 4, 5


def linear_inputs(**overrides):
    inputs = {"q": jnp.ones((B, T, H, K)), "k": jnp.ones((B, T, H, K)), "v": jnp.ones((B, T, H, V))}
    inputs.update(overrides)
    return inputs


LINEAR_CASES = {
    "q-rank": (dict(q=jnp.ones((B, T, H))), r"`q` must have rank 4 .*\(2, 10, 3\)"),
    "k-batch": (dict(k=jnp.ones((B + 1, T, H, K))), r"`k` has shape \(3, 10, 3, 4\).*B of `q`"),
    "k-time": (dict(k=jnp.ones((B, T - 1, H, K))), r"`k` has shape \(2, 9, 3, 4\).*T of `q`"),
    "k-heads": (dict(k=jnp.ones((B, T, H + 1, K))), r"`k` has shape .*H of `q`"),
    "k-dim": (dict(k=jnp.ones((B, T, H, K + 1))), r"`k` has shape \(2, 10, 3, 5\).*K of `q`"),
    "v-time": (dict(v=jnp.ones((B, T + 1, H, V))), r"`v` has shape \(2, 11, 3, 5\).*T of `q`"),
    "v-rank": (dict(v=jnp.ones((B, T, H * V))), r"`v` must have rank 4"),
    "g-rank": (dict(g=jnp.zeros((B, T))), r"`g` must be \[H\] or \[B, T, H\].*\(2, 10\)"),
    "g-heads": (dict(g=jnp.zeros((H + 1,))), r"`g` has shape \(4,\).*H of `q`"),
    "g-time": (dict(g=jnp.zeros((B, T + 2, H))), r"`g` has shape \(2, 12, 3\)"),
    "gk-shape": (dict(gk=jnp.zeros((B, T, H, K + 1))), r"`gk` has shape \(2, 10, 3, 5\)"),
    "gk-rank": (dict(gk=jnp.zeros((B, T, H))), r"`gk` must have rank 4"),
    "positive-gate": (dict(g=jnp.full((B, T, H), 0.5)), r"`g` holds log decays.*<= 0"),
    "nan-gate": (dict(gk=jnp.full((B, T, H, K), jnp.nan)), r"`gk` holds log decays"),
    "empty": (
        dict(q=jnp.ones((B, 0, H, K)), k=jnp.ones((B, 0, H, K)), v=jnp.ones((B, 0, H, V))),
        r"T=0",
    ),
    "int-input": (dict(q=jnp.ones((B, T, H, K), jnp.int32)), r"`q` must be a floating"),
    "state-shape": (
        dict(initial_state=jnp.zeros((B, H, K, V + 1))),
        r"`initial_state` must have shape .*\(2, 3, 4, 5\).*got \(2, 3, 4, 6\)",
    ),
    "state-normalize": (
        dict(initial_state=jnp.zeros((B, H, K, V)), normalize=True),
        r"`initial_state` .*V\+1.*\(2, 3, 4, 6\)",
    ),
}


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_linear_attention_rejects(name):
    overrides, message = LINEAR_CASES[name]
    overrides = dict(overrides)
    normalize = overrides.pop("normalize", False)
    with pytest.raises(ValueError, match=message):
        ops.linear_attention(**linear_inputs(**overrides), normalize=normalize)


@pytest.mark.parametrize("op", [ops.linear_attention, ops.softmax_attention])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="fast"), r"unknown `mode`='fast'"),
        (dict(chunk_size=0), r"`chunk_size` must be a positive int"),
        (dict(backend="cuda"), r"unknown `backend`='cuda'"),
        (dict(cu_seqlens=jnp.array([0, 4, 10])), r"need batch size B == 1; got B=2"),
    ],
)
def test_common_arguments_are_checked(op, kwargs, message):
    inputs = linear_inputs(v=jnp.ones((B, T, H, K)))
    with pytest.raises(ValueError, match=message):
        op(**inputs, **kwargs)


@pytest.mark.parametrize(
    "cu, message",
    [
        (np.array([0, 4, 9]), r"end at T=10; got \[0, 4, 9\]"),
        (np.array([1, 4, 10]), r"start at 0"),
        (np.array([0, 6, 4, 10]), r"never decrease"),
        (np.array([0.0, 10.0]), r"integer array"),
        (np.array([[0, 10]]), r"`cu_seqlens` must have rank 1"),
        (np.array([0]), r"at least two boundaries"),
    ],
)
def test_cu_seqlens_are_checked(cu, message):
    inputs = {n: x[:1] for n, x in linear_inputs().items()}
    with pytest.raises(ValueError, match=message):
        ops.linear_attention(**inputs, cu_seqlens=cu)


def test_packed_initial_state_needs_one_row_per_sequence():
    inputs = {n: x[:1] for n, x in linear_inputs().items()}
    message = r"\(3, 3, 4, 5\) with N = the number of sequences.*got \(1, 3, 4, 5\)"
    with pytest.raises(ValueError, match=message):
        ops.linear_attention(
            **inputs, cu_seqlens=np.array([0, 3, 7, 10]), initial_state=jnp.zeros((1, H, K, V))
        )


ATTENTION_CASES = {
    "gqa-heads": (
        dict(k=jnp.ones((B, T, 2, K)), v=jnp.ones((B, T, 2, V))),
        r"Hq=3 .*multiple of key/value heads Hkv=2",
    ),
    "k-dim": (dict(k=jnp.ones((B, T, H, K + 2))), r"`k` has shape \(2, 10, 3, 6\).*D of `q`"),
    "v-time": (dict(v=jnp.ones((B, T - 1, H, V))), r"`v` has shape \(2, 9, 3, 5\).*Tk of `k`"),
    "more-queries": (dict(q=jnp.ones((B, T + 1, H, K))), r"more tokens \(Tq=11\) than `k`"),
    "window": (dict(window=0), r"`window` must be None or a positive int; got 0"),
    "empty": (dict(q=jnp.ones((B, 0, H, K))), r"T=0 is not allowed"),
    "rank": (dict(k=jnp.ones((B, T, K))), r"`k` must have rank 4"),
}


@pytest.mark.parametrize("name", ATTENTION_CASES)
@pytest.mark.parametrize("op", [ops.softmax_attention, ops.sigmoid_attention])
def test_attention_rejects(op, name):
    overrides, message = ATTENTION_CASES[name]
    inputs = linear_inputs()
    inputs.update(overrides)
    with pytest.raises(ValueError, match=message):
        op(**inputs)


# --- values and types (issue 24): eager calls, concrete values, the check raises at once


def delta_inputs(rows: int = T, **overrides):
    inputs = {
        "q": jnp.ones((B, T, H, K)),
        "k": jnp.ones((B, rows, H, K)),
        "v": jnp.ones((B, rows, H, V)),
        "beta": jnp.full((B, rows, H), 0.5),
    }
    inputs.update(overrides)
    return inputs


def call_delta(op_name, **overrides):
    if op_name == "delta_rule":
        return ops.delta_rule(**delta_inputs(**overrides))
    inputs = delta_inputs(rows=2 * T, **overrides)
    return ops.delta_product(**inputs, num_householder=2)


@pytest.mark.parametrize("op_name", ["delta_rule", "delta_product"])
@pytest.mark.parametrize(
    "bad, got",
    [
        (5.0, r"5 at index \(0, 3, 1\) \(1 of \d+ values fail\)"),
        (-1.0, "-1 at"),
        (np.nan, "nan at"),
    ],
)
def test_beta_must_be_finite_and_in_zero_two(op_name, bad, got):
    rows = T if op_name == "delta_rule" else 2 * T
    beta = np.full((B, rows, H), 0.5, np.float32)
    beta[0, 3, 1] = bad
    message = rf"^{op_name}: `beta` must be finite and in \[0, 2\]; got {got}"
    with pytest.raises(ValueError, match=message):
        call_delta(op_name, beta=jnp.asarray(beta))


def test_beta_zero_and_two_are_allowed():
    """0 is the identity step (MoM's unrouted tokens), 2 a reflection: both run."""
    beta = jnp.zeros((B, T, H)).at[:, 1::2].set(2.0)
    k = jnp.full((B, T, H, K), K**-0.5)  # unit keys: I − 2kkᵀ is a reflection
    o, state = ops.delta_rule(
        k, k, jnp.ones((B, T, H, V)), beta, mode="recurrent", output_final_state=True
    )
    assert state is not None
    # β = 0 leaves S = 0 at t = 0; β = 2 at t = 1 writes 2·k·(v − 0)ᵀ: S = 2 k vᵀ
    np.testing.assert_allclose(np.asarray(o[:, 0]), 0.0, atol=0)
    np.testing.assert_allclose(np.asarray(o[:, 1]), 2 * K**-0.5, rtol=1e-6)


SCALE_OPS = {
    "linear_attention": lambda **kw: ops.linear_attention(**linear_inputs(), **kw),
    "delta_rule": lambda **kw: ops.delta_rule(**delta_inputs(), **kw),
    "delta_product": lambda **kw: ops.delta_product(
        **delta_inputs(rows=2 * T), num_householder=2, **kw
    ),
    "softmax_attention": lambda **kw: ops.softmax_attention(**linear_inputs(), **kw),
    "sigmoid_attention": lambda **kw: ops.sigmoid_attention(**linear_inputs(), **kw),
    "mixture_of_memories": lambda **kw: ops.mixture_of_memories(**mom_inputs(), **kw),
    "aaren": lambda **kw: ops.aaren(**linear_inputs(q=jnp.ones((H, K))), **kw),
}


def mom_inputs(**overrides):
    memories = 2
    inputs = {
        "q": jnp.ones((B, T, H, K)),
        "k": jnp.ones((B, T, memories, H, K)),
        "v": jnp.ones((B, T, memories, H, V)),
        "beta": jnp.full((B, T, memories, H), 0.5),
        "routing": jnp.full((B, T, memories), 0.5),
    }
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize("op_name", SCALE_OPS)
@pytest.mark.parametrize(
    "scale, error, message",
    [
        (float("nan"), ValueError, r"`scale` must be finite and > 0; got nan$"),
        (float("inf"), ValueError, r"`scale` must be finite and > 0; got inf$"),
        (0.0, ValueError, r"`scale` must be finite and > 0; got 0$"),
        (-0.5, ValueError, r"`scale` must be finite and > 0; got -0.5$"),
        ("a", TypeError, r"`scale` must be None, a number or a 0-d array; got 'a'"),
        (True, TypeError, r"`scale` must be None, a number or a 0-d array; got True"),
        (jnp.ones(2), ValueError, r"`scale` must be .*\(a 0-d array\); got shape \(2,\)"),
    ],
)
def test_scale_must_be_a_finite_positive_number(op_name, scale, error, message):
    with pytest.raises(error, match=rf"^{op_name}: {message}"):
        SCALE_OPS[op_name](scale=scale)


@pytest.mark.parametrize(
    "op_name, call",
    [
        ("linear_attention", lambda x: ops.linear_attention(x, x, jnp.ones((B, T, H, V)))),
        ("delta_rule", lambda x: ops.delta_rule(x, x, jnp.ones((B, T, H, V)), jnp.ones((B, T, H)))),
        ("softmax_attention", lambda x: ops.softmax_attention(x, x, x)),
        ("aaren", lambda x: ops.aaren(jnp.ones((H, 0)), x, jnp.ones((B, T, H, V)))),
    ],
)
def test_a_zero_key_dim_is_a_clear_error(op_name, call):
    with pytest.raises(ValueError, match=rf"^{op_name}: .*key dimension (K|D) must be >= 1; got"):
        call(jnp.ones((B, T, H, 0)))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(normalize="no"),
            TypeError,
            r"`normalize` must be a bool \(True or False\); got 'no'",
        ),
        (dict(normalize=1), TypeError, r"`normalize` must be a bool"),
        (dict(output_final_state="yes"), TypeError, r"`output_final_state` must be a bool"),
        (dict(chunk_size="8"), TypeError, r"`chunk_size` must be a positive int; got '8'"),
        (dict(chunk_size=2.0), TypeError, r"`chunk_size` must be a positive int; got 2.0"),
        (dict(g=jnp.array([-0.1, 0.0, 0.3])), ValueError, r"`g` holds log decays.*got max 0.3"),
        (
            dict(g=jnp.array([-0.1, -jnp.inf, 0.0])),
            ValueError,
            r"`g` holds log decays and must be finite and <= 0; got -inf \(max 0.0\) "
            r"\(shape \(3,\)\)",
        ),
    ],
)
def test_linear_attention_rejects_bad_types_and_values(kwargs, error, message):
    with pytest.raises(error, match=rf"^linear_attention: {message}"):
        ops.linear_attention(**linear_inputs(), **kwargs)


@pytest.mark.parametrize(
    "op_name, call",
    [
        ("delta_rule", lambda g: ops.delta_rule(**delta_inputs(), g=g)),
        (
            "delta_product",
            lambda g: ops.delta_product(**delta_inputs(2 * T), g=g, num_householder=2),
        ),
        (
            "delta_rule",
            lambda g: ops.delta_rule(**delta_inputs(), gk=jnp.zeros((B, T, H, K)) + g[..., None]),
        ),
    ],
)
def test_delta_gates_must_be_log_decays(op_name, call):
    with pytest.raises(ValueError, match=rf"^{op_name}: `gk?` holds log decays.*got max 0.5"):
        call(jnp.full((H,), 0.5) if "product" in op_name else jnp.full((B, T, H), 0.5))


@pytest.mark.parametrize(
    "bias, error, message",
    [
        ("x", TypeError, r"`bias` must be None, a number or an array \[Tq\]; got 'x'"),
        (True, TypeError, r"`bias` must be None, a number or an array \[Tq\]; got True"),
        (jnp.zeros(T, bool), TypeError, r"`bias` .*got an array of dtype bool"),
        (float("nan"), ValueError, r"`bias` must be finite \(no NaN or inf\); got nan$"),
        (
            jnp.zeros(T).at[4].set(jnp.inf),
            ValueError,
            r"`bias` must be finite \(no NaN or inf\); got inf at index \(4,\)",
        ),
    ],
)
def test_sigmoid_bias_must_be_a_finite_number(bias, error, message):
    with pytest.raises(error, match=rf"^sigmoid_attention: {message}"):
        ops.sigmoid_attention(**linear_inputs(), bias=bias)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(causal="yes"), TypeError, r"`causal` must be a bool"),
        (dict(window=1.5), TypeError, r"`window` must be None or a positive int; got 1.5"),
        (dict(window=-2), ValueError, r"`window` must be None or a positive int; got -2"),
        (
            dict(kv_length=7.0, mode="parallel"),
            TypeError,
            r"`kv_length` must be an int or a 0-d integer array; got 7.0",
        ),
        (
            dict(kv_length=jnp.array([7]), mode="parallel"),
            TypeError,
            r"`kv_length` .*dtype int32 and shape \(1,\)",
        ),
    ],
)
@pytest.mark.parametrize("op", [ops.softmax_attention, ops.sigmoid_attention])
def test_attention_rejects_bad_types_and_values(op, kwargs, error, message):
    with pytest.raises(error, match=rf"^{op.__name__}: {message}"):
        op(**linear_inputs(), **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(routing=jnp.full((B, T, 2), 0.5).at[1, 2, 0].set(-1.0)),
            r"`routing` must be finite "
            r"and >= 0; got -1 at index \(1, 2, 0\)",
        ),
        (dict(routing=jnp.full((B, T, 2), jnp.nan)), r"`routing` must be finite and >= 0; got nan"),
        (dict(beta=jnp.full((B, T, 2, H), 7.0)), r"`beta` must be finite and in \[0, 2\]; got 7"),
        (
            dict(beta=jnp.full((B, T, 2, H), -0.5)),
            r"`beta` must be finite and in \[0, 2\]; got -0.5",
        ),
    ],
)
def test_mixture_of_memories_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=rf"^mixture_of_memories: {message}"):
        ops.mixture_of_memories(**mom_inputs(**overrides))


def memory_call(**overrides):
    gates = jnp.full((B, T, H), 0.5)
    inputs = {
        "q": jnp.ones((B, T, H, K)),
        "k": jnp.ones((B, T, H, K)),
        "v": jnp.ones((B, T, H, V)),
        "lr": gates,
        "momentum": gates,
        "decay": gates,
        "memory": [jnp.zeros((H, K, V))],
    }
    inputs.update(overrides)
    return ops.neural_memory(**inputs)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            dict(momentum=jnp.full((B, T, H), 1.5)),
            ValueError,
            r"`momentum` must be finite and "
            r"in \[0, 1\]; got 1.5",
        ),
        (
            dict(decay=jnp.full((B, T, H), 2.0)),
            ValueError,
            r"`decay` must be finite and in "
            r"\[0, 1\]; got 2",
        ),
        (dict(decay=jnp.full((B, T, H), -0.1)), ValueError, r"`decay` must be .*; got -0.1"),
        (
            dict(lr=jnp.full((B, T, H), -1e-3)),
            ValueError,
            r"`lr` must be finite and >= 0; "
            r"got -0.001",
        ),
        (
            dict(lr=jnp.full((B, T, H), jnp.inf)),
            ValueError,
            r"`lr` must be finite and >= 0; "
            r"got inf",
        ),
        (
            dict(omega_weights=jnp.full((B, T, H), 1.01)),
            ValueError,
            r"`omega_weights` must be "
            r"finite and in \[0, 1\]; got 1.01",
        ),
        (dict(omega_window=1.5), TypeError, r"`omega_window` must be a positive int; got 1.5"),
        (dict(newton_schulz_steps="5"), TypeError, r"`newton_schulz_steps` must be a positive"),
        (dict(max_surprise_norm="1"), TypeError, r"`max_surprise_norm` must be a positive"),
        (dict(optimizer=["muon"]), ValueError, r"unknown `optimizer`=\['muon'\]"),
        (dict(state_position=2.0), TypeError, r"`state_position` must be an int or a 0-d int"),
        (dict(output_final_state=None), TypeError, r"`output_final_state` must be a bool"),
    ],
)
def test_neural_memory_rejects_bad_hyper_parameters(overrides, error, message):
    with pytest.raises(error, match=rf"^neural_memory: {message}"):
        memory_call(**overrides)


@pytest.mark.parametrize(
    "a, message",
    [
        (jnp.full((B, T, H, V), 1.5), r"got 1.5 at index \(0, 0, 0, 0\)"),
        (jnp.zeros((B, T, H, V)).at[1, 2, 0, 3].set(-1.01), r"got -1.01 at index \(1, 2, 0, 3\)"),
        (jnp.full((B, T, H, V), jnp.nan), r"got nan"),
    ],
)
def test_diagonal_recurrence_transition_must_lie_in_minus_one_one(a, message):
    with pytest.raises(
        ValueError,
        match=rf"^diagonal_recurrence: `a` must be finite and in "
        rf"\[-1, 1\] \(\|a\| <= 1\); {message}",
    ):
        ops.diagonal_recurrence(a, jnp.ones((B, T, H, V)))


def test_num_householder_type_and_value():
    inputs = delta_inputs(rows=2 * T)
    with pytest.raises(
        TypeError,
        match=r"^delta_product: `num_householder` must be a positive "
        r"int; got 2.0",
    ):
        ops.delta_product(**inputs, num_householder=2.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"`num_householder` must be a positive int; got -1"):
        ops.delta_product(**inputs, num_householder=-1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(batch=-1), ValueError, r"`batch` must be a non-negative int; got -1"),
        (dict(batch=2.0), TypeError, r"`batch` must be a non-negative int; got 2.0"),
        (dict(key_dim=0), ValueError, r"`key_dim` must be a positive int; got 0"),
        (dict(value_dim="3"), TypeError, r"`value_dim` must be a positive int; got '3'"),
        (dict(omega_window=0), ValueError, r"`omega_window` must be a positive int; got 0"),
        (dict(memory=[]), ValueError, r"`memory` must be a non-empty sequence"),
    ],
)
def test_init_neural_memory_state_rejects(kwargs, error, message):
    arguments = dict(memory=[jnp.zeros((H, K, V))], batch=B, key_dim=K, value_dim=V)
    arguments.update(kwargs)
    with pytest.raises(error, match=rf"^init_neural_memory_state: {message}"):
        ops.init_neural_memory_state(**arguments)
