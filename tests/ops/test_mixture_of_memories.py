"""``ops.mixture_of_memories``: every form against an independent float64 reference.

The reference below is numpy, token by token and memory by memory, with a
hand-written backward pass (back-propagation through time); it does not import
xformjax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import as_jax, assert_close, log_gates, vjp_of
from xformjax.ops.delta_rule import delta_rule
from xformjax.ops.mixture_of_memories import mixture_of_memories

MODES = ("parallel", "chunk", "recurrent")
HEADS, KEY_DIM, VALUE_DIM, MEMORIES, TOP_K, CHUNK = 2, 6, 5, 4, 2, 16


# ----------------------------------------------------------------------------- reference


def reference(
    q, k, v, beta, routing, g=None, initial_state=None, scale=None, d_o=None, d_final=None
):
    """Float64 MoM, one token and one memory at a time.

    For every (b, m, h): on a routed token (routing ≠ 0) ``S' = exp(g)·S``,
    ``S = S' + β k (v − S'ᵀk)ᵀ``; otherwise ``S`` is unchanged. ``o_t = Σ_m
    routing_m · scale · Sᵀ q_t``. Returns ``(o, final, grads)``; ``grads`` is
    filled when the cotangents ``d_o`` ``[B,T,H,V]`` and ``d_final`` ``[B,M,H,K,V]``
    are given.
    """
    q, k, v, beta, routing = (np.asarray(x, np.float64) for x in (q, k, v, beta, routing))
    batch, length, memories, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    gates = np.zeros(beta.shape) if g is None else np.asarray(g, np.float64)
    init = (
        np.zeros((batch, memories, heads, key_dim, value_dim))
        if initial_state is None
        else np.asarray(initial_state, np.float64)
    )
    o = np.zeros((batch, length, heads, value_dim))
    final = np.zeros_like(init)
    grads = {
        name: np.zeros_like(x)
        for name, x in (
            ("q", q),
            ("k", k),
            ("v", v),
            ("beta", beta),
            ("routing", routing),
            ("g", gates),
            ("initial_state", init),
        )
    }
    for b in range(batch):
        for m in range(memories):
            for h in range(heads):
                states, decayed = [init[b, m, h].copy()], []
                for t in range(length):
                    state = states[-1]
                    decayed.append(None)
                    if routing[b, t, m] != 0:
                        decayed[t] = np.exp(gates[b, t, m, h]) * state
                        kt, vt = k[b, t, m, h], v[b, t, m, h]
                        error = vt - decayed[t].T @ kt
                        state = decayed[t] + beta[b, t, m, h] * np.outer(kt, error)
                    states.append(state)
                    o[b, t, h] += routing[b, t, m] * scale * (state.T @ q[b, t, h])
                final[b, m, h] = states[-1]
                if d_o is None:
                    continue
                d_state = np.array(d_final[b, m, h], np.float64)
                for t in reversed(range(length)):
                    state, weight = states[t + 1], routing[b, t, m]
                    read = scale * (state.T @ q[b, t, h])
                    grads["routing"][b, t, m] += read @ d_o[b, t, h]
                    d_read = weight * d_o[b, t, h]
                    grads["q"][b, t, h] += scale * (state @ d_read)
                    d_state = d_state + scale * np.outer(q[b, t, h], d_read)
                    if weight == 0:
                        continue  # identity transition: d_state passes through
                    kt, vt, bt = k[b, t, m, h], v[b, t, m, h], beta[b, t, m, h]
                    error = vt - decayed[t].T @ kt
                    grads["beta"][b, t, m, h] += kt @ d_state @ error
                    d_error = bt * (d_state.T @ kt)
                    grads["k"][b, t, m, h] += bt * (d_state @ error) - decayed[t] @ d_error
                    grads["v"][b, t, m, h] += d_error
                    d_decayed = d_state - np.outer(kt, d_error)
                    decay = np.exp(gates[b, t, m, h])
                    grads["g"][b, t, m, h] += decay * np.sum(states[t] * d_decayed)
                    d_state = decay * d_decayed
                grads["initial_state"][b, m, h] = d_state
    return o, final, grads


# ----------------------------------------------------------------------------- inputs


def l2_normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def top_k_routing(
    rng: np.random.Generator, batch: int, length: int, memories: int, top_k: int
) -> np.ndarray:
    """Renormalised top-k softmax weights of random logits; zero elsewhere."""
    logits = rng.standard_normal((batch, length, memories)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    keep = np.argsort(-probs, axis=-1)[..., :top_k]
    mask = np.zeros_like(probs, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    weights = np.where(mask, probs, 0.0)
    return weights / weights.sum(-1, keepdims=True)


def make_inputs(
    length: int, *, gated: bool, with_initial_state: bool = True, batch: int = 2, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    streams = (batch, length, MEMORIES, HEADS)
    inputs = {
        "q": l2_normalized(rng.standard_normal((batch, length, HEADS, KEY_DIM))),
        "k": l2_normalized(rng.standard_normal(streams + (KEY_DIM,))),
        "v": rng.standard_normal(streams + (VALUE_DIM,)),
        "beta": rng.uniform(0.0, 2.0, streams),
        "routing": top_k_routing(rng, batch, length, MEMORIES, TOP_K),
    }
    if gated:
        inputs["g"] = log_gates(rng, streams, "weak")
    if with_initial_state:
        inputs["initial_state"] = rng.standard_normal((batch, MEMORIES, HEADS, KEY_DIM, VALUE_DIM))
    return inputs


def run_op(mode: str, **kwargs):
    """The op as a jitted function of a dict of floating inputs (eager dispatch is slow)."""
    return jax.jit(
        lambda floats: mixture_of_memories(
            **floats, mode=mode, chunk_size=CHUNK, output_final_state=True, **kwargs
        )
    )


# ----------------------------------------------------------------------------- tests


@functools.cache
def reference_case(length: int, gated: bool):
    """Inputs, cotangents and the reference's results (shared by the three modes)."""
    inputs = make_inputs(length, gated=gated, with_initial_state=gated)
    rng = np.random.default_rng(1)
    d_o = rng.standard_normal((2, length, HEADS, VALUE_DIM))
    d_final = rng.standard_normal((2, MEMORIES, HEADS, KEY_DIM, VALUE_DIM))
    return inputs, (d_o, d_final), reference(**inputs, d_o=d_o, d_final=d_final)


# every mode at every length; with per-memory decays and an initial state at T = 1
# and T = 37 (three chunks), without either at T = 100
@pytest.mark.parametrize(
    "length, gated",
    [(1, True), (37, True), (100, False)],
    ids=["T1-gated", "T37-gated", "T100-ungated-no-init"],
)
@pytest.mark.parametrize("mode", MODES)
def test_float64_forward_state_and_gradients_match_reference(x64, mode, length, gated):
    inputs, cotangents, (o_ref, final_ref, grads_ref) = reference_case(length, gated)
    (o, final), (grads,) = vjp_of(run_op(mode), (as_jax(inputs),), as_jax(cotangents))
    assert o.dtype == jnp.float64 and final.dtype == jnp.float64
    assert_close(o, o_ref, 1e-9, f"{mode} o")
    assert_close(final, final_ref, 1e-9, f"{mode} final_state")
    for name in inputs:
        assert_close(grads[name], grads_ref[name], 1e-9, f"{mode} d{name}")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_two_halves_equal_the_whole(x64, mode):
    inputs = as_jax(make_inputs(53, gated=True))
    whole, whole_state = run_op(mode)(inputs)
    split = 21
    first = {n: (x if n == "initial_state" else x[:, :split]) for n, x in inputs.items()}
    second = {n: x[:, split:] for n, x in inputs.items() if n != "initial_state"}
    o_first, state = run_op(mode)(first)
    o_second, final = run_op(mode)({**second, "initial_state": state})
    assert_close(jnp.concatenate([o_first, o_second], 1), whole, 1e-10, f"{mode} o")
    assert_close(final, whole_state, 1e-10, f"{mode} final_state")


@pytest.mark.parametrize("mode", MODES)
def test_mom_against_a_per_memory_loop(mode):
    """The op equals ``delta_rule`` run separately on each memory's masked inputs,
    the outputs summed with the routing weights."""
    inputs = as_jax(make_inputs(45, gated=True), jnp.float32)
    o, final = run_op(mode, scale=0.3)(inputs)

    @jax.jit
    def per_memory_loop(floats):
        routed = floats["routing"] != 0
        total, finals = 0.0, []
        for m in range(MEMORIES):
            beta = jnp.where(routed[:, :, m, None], floats["beta"][:, :, m], 0.0)
            g = jnp.where(routed[:, :, m, None], floats["g"][:, :, m], 0.0)
            o_m, final_m = delta_rule(
                floats["q"],
                floats["k"][:, :, m],
                floats["v"][:, :, m],
                beta,
                g=g,
                scale=0.3,
                initial_state=floats["initial_state"][:, m],
                output_final_state=True,
                mode=mode,
                chunk_size=CHUNK,
            )
            total = total + floats["routing"][:, :, m, None, None] * o_m
            finals.append(final_m)
        return total, jnp.stack(finals, 1)

    expected_o, expected_final = per_memory_loop(inputs)
    assert_close(o, expected_o, 1e-5, f"{mode} o")
    assert_close(final, expected_final, 1e-5, f"{mode} final_state")


def test_a_memory_no_token_is_routed_to_is_left_untouched(x64):
    inputs = make_inputs(30, gated=True)
    inputs["routing"][:, :, 2] = 0.0
    inputs = as_jax(inputs)

    def loss(floats):
        o, final = mixture_of_memories(**floats, chunk_size=CHUNK, output_final_state=True)
        return jnp.sum(o**2) + jnp.sum(final[:, :2] ** 2), final

    grads, final = jax.jit(jax.grad(loss, has_aux=True))(inputs)
    np.testing.assert_array_equal(final[:, 2], inputs["initial_state"][:, 2])
    for name in ("k", "v", "beta", "g"):
        assert not np.any(np.asarray(grads[name][:, :, 2])), name
        assert np.any(np.asarray(grads[name][:, :, 1])), name


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = as_jax(make_inputs(40, gated=True), jnp.float32)
    high, high_state = run_op("chunk")(inputs)
    low, low_state = run_op("chunk")(jax.tree.map(lambda x: x.astype(jnp.bfloat16), inputs))
    assert low.dtype == jnp.bfloat16 and low_state.dtype == jnp.float32
    assert_close(low.astype(jnp.float32), high, 2e-2, "bfloat16 o")
    assert_close(low_state, high_state, 2e-2, "bfloat16 final_state")


B, T, M, H, K, V = 2, 10, 3, 2, 4, 5


def shaped_inputs(**overrides):
    inputs = {
        "q": jnp.ones((B, T, H, K)),
        "k": jnp.ones((B, T, M, H, K)),
        "v": jnp.ones((B, T, M, H, V)),
        "beta": jnp.ones((B, T, M, H)),
        "routing": jnp.ones((B, T, M)),
    }
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(q=jnp.ones((B, T, H * K))), r"`q` must have rank 4 .*\(2, 10, 8\)"),
        (dict(k=jnp.ones((B, T, H, K))), r"`k` must have rank 5 \[B, T, M, H, K\]"),
        (dict(k=jnp.ones((B, T, M, H, K + 1))), r"`k` has shape \(2, 10, 3, 2, 5\).*K of `q`"),
        (dict(k=jnp.ones((B, T + 1, M, H, K))), r"`k` has shape \(2, 11, 3, 2, 4\).*T of `q`"),
        (dict(v=jnp.ones((B, T, M + 1, H, V))), r"`v` has shape \(2, 10, 4, 2, 5\).*M of `k`"),
        (dict(v=jnp.ones((B, T, M, H + 1, V))), r"`v` has shape .*H of `q`"),
        (dict(beta=jnp.ones((B, T, H))), r"`beta` must have rank 4 \[B, T, M, H\]"),
        (
            dict(beta=jnp.ones((B, T, M, H + 1))),
            r"`beta` must have shape \[B, T, M, H\] = "
            r"\(2, 10, 3, 2\); got \(2, 10, 3, 3\)",
        ),
        (
            dict(routing=jnp.ones((B, T, M + 1))),
            r"`routing` must have shape \[B, T, M\] = "
            r"\(2, 10, 3\); got \(2, 10, 4\)",
        ),
        (dict(routing=jnp.ones((B, T))), r"`routing` must have rank 3"),
        (dict(routing=jnp.ones((B, T, M), jnp.int32)), r"`routing` must be a floating"),
        (dict(g=jnp.zeros((B, T, H))), r"`g` must have shape \[B, T, M, H\]"),
        (dict(g=jnp.full((B, T, M, H), 0.1)), r"`g` holds log decays.*<= 0"),
        (
            dict(initial_state=jnp.zeros((B, H, K, V))),
            r"`initial_state` must have shape \[B, M, H, K, V\] = \(2, 3, 2, 4, 5\)",
        ),
        (
            dict(
                q=jnp.ones((B, 0, H, K)),
                k=jnp.ones((B, 0, M, H, K)),
                v=jnp.ones((B, 0, M, H, V)),
                beta=jnp.ones((B, 0, M, H)),
                routing=jnp.ones((B, 0, M)),
            ),
            r"`q` has T=0 tokens",
        ),
        (dict(mode="fast"), r"unknown `mode`='fast'"),
        (dict(chunk_size=0), r"`chunk_size` must be a positive int"),
    ],
)
def test_bad_input_raises(overrides, message):
    with pytest.raises(ValueError, match=r"mixture_of_memories: " + message):
        mixture_of_memories(**shaped_inputs(**overrides))
