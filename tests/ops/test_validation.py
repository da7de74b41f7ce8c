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
    "causal": (dict(causal="yes"), r"`causal` must be a bool"),
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
