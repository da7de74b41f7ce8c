"""The ops' value checks under ``jax.jit`` and ``jax.grad``: off by default (nothing in
the program), and with ``xformjax.config`` option ``check_values`` on a
``checkify.check`` that :func:`xformjax.config.checked` turns into the op's
``ValueError``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xformjax
from xformjax import ops

B, T, H, K, V, M = 1, 6, 2, 4, 3, 3


def sequences(seed: int = 0):
    """``q, k, v`` (numpy: making them compiles nothing after the switch clears caches)."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(B, T, H, K)).astype(np.float32) / 2 for _ in range(2))
    return q, k, rng.normal(size=(B, T, H, V)).astype(np.float32)


def linear_with_gate(q, k, v, g):
    return ops.linear_attention(q, k, v, g=g, mode="parallel")[0]


def four_ops(q, k, v, g, beta, cu_seqlens, routing):
    """The issue's four traced cases in one program (one compile per switch setting):
    a gated linear attention, a delta rule, a packed linear attention and a MoM."""
    kk = jnp.broadcast_to(k[:, :, None], (B, T, M, H, K))
    vv = jnp.broadcast_to(v[:, :, None], (B, T, M, H, V))
    return (
        linear_with_gate(q, k, v, g)
        + ops.delta_rule(q, k, v, beta, mode="recurrent")[0]
        + ops.linear_attention(q, k, v, cu_seqlens=cu_seqlens, mode="recurrent")[0]
        + ops.mixture_of_memories(
            q, kk, vv, jnp.full((B, T, M, H), 0.5), routing, mode="recurrent"
        )[0]
    )


GOOD = {
    "g": jnp.log(jnp.full((B, T, H), 0.9)),
    "beta": jnp.full((B, T, H), 0.5),
    "cu_seqlens": jnp.array([0, 2, T], jnp.int32),
    "routing": jnp.full((B, T, M), 1 / M),
}
# (argument, bad value, the message under the switch)
BAD = {
    "positive-gate": (
        "g",
        GOOD["g"].at[0, 3, 1].set(0.25),
        r"^linear_attention: `g` must be finite and <= 0 \(it holds log decays\); "
        r"got values in \[-0\.10\d*, 0\.25\]$",
    ),
    "beta-above-2": (
        "beta",
        GOOD["beta"].at[0, 2, 0].set(5.0),
        r"^delta_rule: `beta` must be finite and in \[0, 2\]; got values in \[0\.5, 5\.0\]$",
    ),
    "beta-nan": (
        "beta",
        GOOD["beta"].at[0, 2, 0].set(jnp.nan),
        r"^delta_rule: `beta` must be finite and in \[0, 2\]; got values in",
    ),
    "cu-seqlens-not-ending-at-T": (
        "cu_seqlens",
        jnp.array([0, 2, T - 1], jnp.int32),
        r"^linear_attention: `cu_seqlens` must be boundaries that start at 0, never "
        r"decrease and end at T=6; got values in \[0, 5\]$",
    ),
    "negative-routing": (
        "routing",
        GOOD["routing"].at[0, 4, 2].set(-1.0),
        r"^mixture_of_memories: `routing` must be finite and >= 0; got values in \[-1\.0, 0\.33",
    ),
}


def primitive_names(jaxpr) -> set[str]:
    """Every primitive in ``jaxpr`` and the jaxprs nested in its equations."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns"):  # a Jaxpr
                    names |= primitive_names(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # a ClosedJaxpr
                    names |= primitive_names(sub.jaxpr)
    return names


def test_bad_values_under_jit_raise_only_with_the_switch_on():
    """Off: the jitted ops run every bad value and the program holds no check. On: each
    bad value raises the op's message, and good values give the unchecked result."""
    q, k, v = sequences()
    all_bad = dict(GOOD, **{name: bad for name, bad, _ in BAD.values()})
    with xformjax.config.override("check_values", False):
        unchecked = jax.jit(four_ops)
        assert unchecked(q, k, v, **all_bad).shape == (B, T, H, V)  # runs, whatever it gives
        want = np.asarray(unchecked(q, k, v, **GOOD))
        assert "check" not in primitive_names(jax.make_jaxpr(four_ops)(q, k, v, **all_bad).jaxpr)
    with xformjax.config.override("check_values", True):
        assert "check" in primitive_names(jax.make_jaxpr(four_ops)(q, k, v, **all_bad).jaxpr)
        checked = xformjax.config.checked(jax.jit(four_ops))
        for case, (name, bad, message) in BAD.items():
            with pytest.raises(ValueError, match=message):
                checked(q, k, v, **dict(GOOD, **{name: bad}))
                pytest.fail(f"{case}: no error")
        np.testing.assert_array_equal(np.asarray(checked(q, k, v, **GOOD)), want)


def test_a_bad_gate_under_grad_raises_and_a_good_one_gives_the_same_gradient():
    q, k, v = sequences(1)

    def loss(q, k, v, g):
        return jnp.sum(linear_with_gate(q, k, v, g) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 3)))
    with xformjax.config.override("check_values", False):
        want = grad(q, k, v, GOOD["g"])
    with xformjax.config.override("check_values", True):
        checked = xformjax.config.checked(grad)
        with pytest.raises(ValueError, match=r"^linear_attention: `g` must be finite and <= 0"):
            checked(q, k, v, GOOD["g"].at[0, 0, 0].set(1.0))
        got = checked(q, k, v, GOOD["g"])
    for name, a, b in zip(("dq", "dg"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_the_other_traced_values_are_checked_under_the_switch():
    """The ops' remaining value checks, under one ``checked(jit(...))`` program fed one
    bad argument at a time: a per-head gate ``[H]``, ``gk``, ``scale``, DeltaProduct's
    β, ``kv_length``, Titans' momentum and the diagonal recurrence's transition."""
    q, k, v = sequences(2)
    gates = jnp.full((B, T, H), 0.5)

    def many_ops(g, gk, scale, beta, kv_length, momentum, a):
        k2, v2 = jnp.repeat(k, 2, 1), jnp.repeat(v, 2, 1)
        outs = [
            ops.linear_attention(q, k, v, g=g, gk=gk, mode="parallel")[0],
            ops.softmax_attention(q, k, v, scale=scale, kv_length=kv_length, mode="parallel")[0],
            ops.delta_product(q, k2, v2, beta, num_householder=2, mode="recurrent")[0],
            ops.neural_memory(
                q, k, v, gates, momentum, gates, [jnp.zeros((H, K, V))], mode="recurrent"
            )[0],
            ops.diagonal_recurrence(a, v, mode="recurrent")[0],
        ]
        return sum(jnp.sum(o) for o in outs)

    good = {
        "g": jnp.full((H,), -0.1),
        "gk": jnp.full((B, T, H, K), -0.1),
        "scale": jnp.float32(0.5),
        "beta": jnp.full((B, 2 * T, H), 0.5),
        "kv_length": jnp.int32(T),
        "momentum": gates,
        "a": jnp.full((B, T, H, V), 0.9),
    }
    bad = {
        "g": (jnp.array([-0.1, 0.1]), r"^linear_attention: `g` must be finite and <= 0"),
        "gk": (good["gk"].at[0, 1].set(jnp.nan), r"^linear_attention: `gk` must be finite"),
        "scale": (jnp.float32(-1.0), r"^softmax_attention: `scale` must be finite and > 0"),
        "beta": (
            good["beta"].at[0, 7, 1].set(-0.5),
            r"^delta_product: `beta` must be finite and in \[0, 2\]; got values in \[-0\.5",
        ),
        "kv_length": (
            jnp.int32(T - 1),
            r"^softmax_attention: `kv_length` must be in \[Tq, Tk\] = \[6, 6\]; got values "
            r"in \[5, 5\]$",
        ),
        "momentum": (
            gates.at[0, 1, 1].set(1.5),
            r"^neural_memory: `momentum` must be finite and in \[0, 1\]",
        ),
        "a": (good["a"].at[0, 0, 0, 0].set(-1.5), r"^diagonal_recurrence: `a` must be finite"),
    }
    with xformjax.config.override("check_values", True):
        checked = xformjax.config.checked(jax.jit(many_ops))
        assert np.isfinite(float(checked(**good)))
        for name, (value, message) in bad.items():
            with pytest.raises(ValueError, match=message):
                checked(**dict(good, **{name: value}))
                pytest.fail(f"{name}: no error")
