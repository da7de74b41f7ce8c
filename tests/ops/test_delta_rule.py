"""``ops.delta_rule`` / ``ops.delta_product``: every form against the float64 reference."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops import reference
from tests.ops.helpers import (
    MODES,
    StateCase,
    as_jax,
    case_gate_grid,
    check_state_op,
    gate_inputs,
    relative_error,
)
from xformjax import ops


@dataclasses.dataclass(frozen=True)
class Case(StateCase):
    beta_max: float = 2.0
    householder: int = 1


CASES = {
    "decode-T1": Case(2, 1, 2, 16, 16, 64),
    "T63-odd-beta01": Case(2, 63, 2, 7, 10, 16, beta_max=1.0, strength="strong"),
    "T100-no-init": Case(1, 100, 3, 16, 8, 32, with_initial_state=False),
    "T257": Case(1, 257, 1, 12, 5, 64, strength="strong"),
    "packed-uneven": Case(
        1, 100, 2, 6, 9, 16, strength="strong", cu_seqlens=(0, 1, 38, 38, 64, 100)
    ),
    "product-n2": Case(2, 63, 2, 8, 6, 32, householder=2, strength="strong"),
    "product-n3-packed": Case(1, 50, 2, 5, 7, 16, householder=3, cu_seqlens=(0, 20, 20, 33, 50)),
}


def l2_normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(case: Case, gate: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.length, case.heads)
    rows = (case.batch, case.length * case.householder, case.heads)
    inputs = {
        "q": l2_normalized(rng.standard_normal(shape + (case.key_dim,))),
        "k": l2_normalized(rng.standard_normal(rows + (case.key_dim,))),
        "v": rng.standard_normal(rows + (case.value_dim,)),
        "beta": rng.uniform(0.0, case.beta_max, rows),
    }
    inputs.update(gate_inputs(rng, gate, shape, case.key_dim, case.strength))
    if case.with_initial_state:
        inputs["initial_state"] = rng.standard_normal(
            (case.num_states, case.heads, case.key_dim, case.value_dim)
        )
    return inputs


def op_for(case: Case, mode: str):
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)
    common = dict(cu_seqlens=cu, mode=mode, chunk_size=case.chunk_size, output_final_state=True)
    if case.householder == 1:
        return lambda floats: ops.delta_rule(**floats, **common)
    return lambda floats: ops.delta_product(**floats, num_householder=case.householder, **common)


def check_against_reference(case: Case, gate: str, mode: str, dtype, tol: float, seed: int = 0):
    inputs = make_inputs(case, gate, seed)
    reference_fn = functools.partial(
        reference.delta_product,
        **inputs,
        num_householder=case.householder,
        cu_seqlens=case.cu_seqlens,
    )
    check_state_op(
        op_for(case, mode), reference_fn, inputs, case, dtype, tol, width=case.value_dim, seed=seed
    )


@pytest.mark.parametrize(
    "case, gate", case_gate_grid(CASES, ("T63-odd-beta01", "packed-uneven", "product-n2")), ids=str
)
@pytest.mark.parametrize("mode", MODES)
def test_float64_matches_reference(x64, mode, gate, case):
    check_against_reference(CASES[case], gate, mode, jnp.float64, 1e-9)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes_agree_with_the_reference(x64, chunk_size):
    case = dataclasses.replace(CASES["T257"], chunk_size=chunk_size)
    check_against_reference(case, "token+channel", "chunk", jnp.float64, 1e-9)


@pytest.mark.parametrize("gate", ["token", "token+channel"])
@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_reference(mode, gate):
    check_against_reference(CASES["T257"], gate, mode, jnp.float32, 1e-4)
    check_against_reference(CASES["product-n3-packed"], gate, mode, jnp.float32, 1e-4)


def test_one_householder_step_is_the_delta_rule(x64):
    inputs = as_jax(make_inputs(CASES["T63-odd-beta01"], "token+channel"))
    product, product_state = ops.delta_product(**inputs, num_householder=1, output_final_state=True)
    rule, rule_state = ops.delta_rule(**inputs, output_final_state=True)
    assert relative_error(product, rule) <= 1e-14
    assert relative_error(product_state, rule_state) <= 1e-14


def test_decoding_continues_a_chunked_prefix(x64):
    inputs = make_inputs(CASES["T100-no-init"], "token+channel")
    full, _ = ops.delta_rule(**as_jax(inputs))
    prefix = 95
    _, state = ops.delta_rule(
        **as_jax({n: x[:, :prefix] for n, x in inputs.items()}), output_final_state=True
    )
    step = jax.jit(
        lambda x, s: ops.delta_rule(**x, initial_state=s, mode="recurrent", output_final_state=True)
    )
    for t in range(prefix, inputs["q"].shape[1]):
        o_t, state = step(as_jax({n: x[:, t : t + 1] for n, x in inputs.items()}), state)
        assert relative_error(o_t, full[:, t : t + 1]) <= 1e-12


@pytest.mark.optimized
def test_float32_chunk_on_4096_tokens_matches_float64_reference():
    case = Case(1, 4096, 1, 16, 16, 64, beta_max=2.0, with_initial_state=False)
    inputs = make_inputs(case, "token")
    o_ref, final_ref, _ = reference.delta_product(**inputs)
    o, final = jax.jit(lambda x: ops.delta_rule(**x, output_final_state=True))(
        as_jax(inputs, jnp.float32)
    )
    assert relative_error(o, o_ref) <= 1e-4
    assert relative_error(final, final_ref) <= 1e-4


@pytest.mark.optimized
def test_16k_tokens_with_beta_near_two_and_strong_gates():
    rng = np.random.default_rng(5)
    length, dim = 16384, 16
    shape = (1, length, 2)
    q, k = (
        jnp.asarray(l2_normalized(rng.standard_normal(shape + (dim,))), jnp.float32)
        for _ in range(2)
    )
    v = jnp.asarray(rng.standard_normal(shape + (dim,)), jnp.float32)
    beta = jnp.asarray(rng.uniform(1.95, 1.999, shape), jnp.float32)
    gk = jnp.asarray(np.log(rng.uniform(5e-4, 2e-3, shape + (dim,))), jnp.float32)
    run = jax.jit(
        lambda mode: ops.delta_rule(q, k, v, beta, gk=gk, mode=mode, output_final_state=True),
        static_argnums=0,
    )
    chunked, final = run("chunk")
    recurrent, final_rec = run("recurrent")
    assert bool(jnp.all(jnp.isfinite(chunked))) and bool(jnp.all(jnp.isfinite(final)))
    assert relative_error(chunked, recurrent) <= 1e-4
    assert relative_error(final, final_rec) <= 1e-4


def test_repeated_forward_and_backward_never_hangs():
    """A jitted chunked forward+backward, 300 times, in a subprocess under a timeout.

    Differentiating batched ``solve_triangular`` deadlocks XLA:CPU on jaxlib 0.10.2;
    the chunk form avoids it, and this keeps a regression from stalling CI.
    """
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from xformjax import ops
        x = jax.random.normal(jax.random.key(0), (1, 256, 4, 64))
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        beta = jnp.full((1, 256, 4), 0.5)
        loss = lambda q, b: ops.delta_rule(q, x, x, b, g=jnp.full((4,), -0.1))[0].sum()
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        for _ in range(300):
            jax.block_until_ready(step(x, beta))
        print("done")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=jnp.ones((2, 10, 4))), r"`beta` must have shape \[B, T, H\] = \(2, 10, 3\)"),
        (dict(beta=jnp.ones((2, 10, 3), jnp.int32)), r"`beta` must be a floating"),
        (dict(g=jnp.zeros((2, 10))), r"`g` must be \[H\] or \[B, T, H\]"),
        (dict(mode="fast"), r"unknown `mode`='fast'"),
    ],
)
def test_delta_rule_rejects(kwargs, message):
    inputs = {
        "q": jnp.ones((2, 10, 3, 4)),
        "k": jnp.ones((2, 10, 3, 4)),
        "v": jnp.ones((2, 10, 3, 5)),
        "beta": jnp.ones((2, 10, 3)),
    }
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.delta_rule(**inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=jnp.ones((2, 15, 3, 4))), r"`k` must have T·n = 10·2 = 20 rows.*\(2, 15, 3, 4\)"),
        (dict(v=jnp.ones((2, 10, 3, 5))), r"`v` has shape \(2, 10, 3, 5\).*T·n of `q`"),
        (dict(beta=jnp.ones((2, 10, 3))), r"`beta` must have shape \[B, T, H\] = \(2, 20, 3\)"),
        (dict(num_householder=0), r"`num_householder` must be a positive int; got 0"),
    ],
)
def test_delta_product_rejects(kwargs, message):
    inputs = {
        "q": jnp.ones((2, 10, 3, 4)),
        "k": jnp.ones((2, 20, 3, 4)),
        "v": jnp.ones((2, 20, 3, 5)),
        "beta": jnp.ones((2, 20, 3)),
        "num_householder": 2,
    }
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.delta_product(**inputs)
