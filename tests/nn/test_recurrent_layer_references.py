"""The delta-rule, diagonal-RNN and neural-memory layers against float64 numpy written
from their docstrings, with the layers' own weights (the pattern of
tests/nn/test_layer_references.py): projections, convolutions, gates, feature maps,
attention branches and read-outs are recomputed here; the recurrences are the float64
token-by-token references (``tests/ops/reference.py``, the neural memory's in
``tests/ops/test_neural_memory.py``). Catches a wrong gate formula, sign, layout,
position or scale that the form-agreement tests (all built on the same op) cannot see.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_layer_references import (
    CONFIG,
    H,
    T,
    causal_conv,
    heads,
    inputs,
    l2,
    read_out,
    rms_norm,
    silu,
    weights,
)
from tests.ops import reference
from tests.ops.helpers import assert_close
from tests.ops.test_neural_memory import mlp
from tests.ops.test_neural_memory import reference as memory_reference
from xformjax.nn.atlas import Atlas
from xformjax.nn.deltanet import DeltaNet, DeltaProduct
from xformjax.nn.diagonal import DiagonalRNN
from xformjax.nn.titans import TitansMAC, TitansMAG

B = 2


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def bias(dense) -> np.ndarray:
    return np.asarray(dense.bias[...], np.float64)


def streams(layer, x, names=("q", "k", "v")):
    """``SiLU(conv(x W_s))`` (no conv where the layer has none for ``s``)."""
    out = {}
    for name in names:
        projected = x @ weights(layer.projections[name])
        conv = layer.convs.get(name)
        out[name] = silu(projected if conv is None else causal_conv(projected, conv))
    return out


def call(layer, x, mode=None):
    """The layer on a fresh sequence, under one ``jax.jit``. The delta-rule and diagonal
    layers run their op's recurrent form (cheapest to compile; every form runs the same
    projections and gates, and tests/nn/test_mixers.py checks that the forms agree)."""
    return jax.jit(lambda x: layer(x, mode=mode))(jnp.asarray(x))


# ----------------------------------------------------------------------------- delta rule


def test_deltanet_layer(x64):
    """``S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, β = σ(x W_β) (2σ: DeltaProduct's
    test, the same code)."""
    neg = False
    config = dataclasses.replace(CONFIG, chunk_size=8, allow_neg_eigval=neg)
    layer = DeltaNet(config, rngs=nnx.Rngs(1))
    x = inputs()
    y, state = call(layer, x, "recurrent")
    s = streams(layer, x)
    q, k, v = l2(heads(s["q"])), l2(heads(s["k"])), heads(s["v"])
    beta = (2.0 if neg else 1.0) * sigmoid(x @ weights(layer.beta_proj))
    o, final, _ = reference.delta_product(q, k, v, beta)
    assert_close(y, read_out(layer, o, x), 1e-9, f"DeltaNet (allow_neg_eigval={neg})")
    assert_close(state.memory, final, 1e-9, "DeltaNet final state")


def test_deltaproduct_layer(x64):
    """Per token: the decay a_t once, then n delta steps with their own k_{t,j}, v_{t,j},
    β_{t,j} (each projection's output holds the n steps' heads, step-major)."""
    n = 3
    config = dataclasses.replace(CONFIG, chunk_size=8, num_householder=n, allow_neg_eigval=True)
    layer = DeltaProduct(config, rngs=nnx.Rngs(2))
    x = inputs()
    y, state = call(layer, x, "recurrent")
    s = streams(layer, x)
    q = l2(heads(s["q"]))
    k = l2(s["k"].reshape(B, T, n, H, -1)).reshape(B, T * n, H, -1)
    v = s["v"].reshape(B, T * n, H, -1)
    beta = (2 * sigmoid(x @ weights(layer.beta_proj))).reshape(B, T * n, H)
    a_log = np.asarray(layer.a_log[...], np.float64)
    dt_bias = np.asarray(layer.dt_bias[...], np.float64)
    log_a = -np.exp(a_log) * np.logaddexp(0, x @ weights(layer.gate_proj) + dt_bias)
    o, final, _ = reference.delta_product(q, k, v, beta, num_householder=n, g=log_a)
    assert_close(y, read_out(layer, o, x), 1e-9, "DeltaProduct")
    assert_close(state.memory, final, 1e-9, "DeltaProduct final state")


# ----------------------------------------------------------------------------- diagonal RNN


@pytest.mark.parametrize("neg", [False, True], ids=["a-sigmoid", "a-2sigmoid-1"])
def test_diagonal_rnn_layer(x64, neg):
    """``a_t = σ(x W_a + b_a)`` (or ``2σ(·) − 1``), ``h_t = a_t ⊙ h_{t-1} + x_t W_b``."""
    config = dataclasses.replace(CONFIG, chunk_size=8, allow_neg_eigval=neg)
    layer = DiagonalRNN(config, rngs=nnx.Rngs(3))
    x = inputs()
    y, state = call(layer, x, "recurrent")
    gate = sigmoid(x @ weights(layer.transition) + bias(layer.transition))
    a = heads(2 * gate - 1 if neg else gate)
    b = heads(x @ weights(layer.inputs))
    if neg:  # the regime the flag exists for: some transitions are negative
        assert (a < 0).any()
    h = np.zeros_like(b)
    state_h = np.zeros(b[:, 0].shape)
    for t in range(T):
        state_h = a[:, t] * state_h + b[:, t]
        h[:, t] = state_h
    assert_close(y, read_out(layer, h, x), 1e-9, f"diagonal RNN (allow_neg_eigval={neg})")
    assert_close(state.memory, state_h, 1e-9, "diagonal RNN final state")


# ----------------------------------------------------------------------------- neural memory

# chunk (= MAC segment) of 5 tokens: 13 tokens are two full chunks and a partial one
MEMORY_CONFIG = dataclasses.replace(CONFIG, chunk_size=5)


def memory_inputs(layer, x, source_streams):
    """The memory's tokens from ``source_streams`` (SiLU'd streams of x or ỹ) and the
    gates ``σ(x W + b)`` (θ = lr, η = momentum, α = decay, γ = gamma or 1) of ``x``;
    q and k L2-normalised per head, then the layer's feature map (ATLAS's φ)."""
    q, k = l2(heads(source_streams["q"])), l2(heads(source_streams["k"]))
    poly = getattr(layer, "poly", None)
    if poly is not None:  # φ(z) = Σ_i a_{h,i} z^{∘i}
        a = np.asarray(poly[...], np.float64)  # [H, p]

        def phi(z):
            return sum(a[:, i, None] * z ** (i + 1) for i in range(a.shape[1]))

        q, k = phi(q), phi(k)
    gates = {name: sigmoid(x @ weights(g) + bias(g)) for name, g in layer.gates.items()}
    return {
        "q": q,
        "k": k,
        "v": heads(source_streams["v"]),
        "lr": gates["lr"],
        "momentum": gates["momentum"],
        "decay": gates["decay"],
        "gamma": gates.get("gamma", np.ones(gates["lr"].shape)),
    }


def run_memory(layer, config, tokens, state=None):
    """The float64 neural memory with the paper's chunk approximation (chunk C); Titans'
    memory is momentum with c = 1 whatever the config's ATLAS fields say."""
    return memory_reference(
        tokens,
        [np.asarray(w[...], np.float64) for w in layer.memory],
        omega_window=config.omega_window if isinstance(layer, Atlas) else 1,
        optimizer=config.memory_optimizer if isinstance(layer, Atlas) else "momentum",
        chunk_size=config.chunk_size,
        ns_steps=config.newton_schulz_steps,
        max_surprise_norm=config.max_surprise_norm,
        state=state,
    )


def test_atlas_layer(x64):
    """ATLAS with the Omega window (c = 4, learned γ), φ of degree 2 (coefficients set
    apart per head and power) and the Muon update, with a surprise clip that bites:
    ``o_t = M_{W_t}(φ(q_t))``, ``y = W_o (SiLU(x W_g) ⊙ RMSNorm(o))``. (Titans' MAL
    memory, momentum with c = 1 and φ = identity, is MAG's memory branch below.)"""
    config = dataclasses.replace(MEMORY_CONFIG, omega_window=4, max_surprise_norm=0.5)
    assert (config.poly_degree, config.memory_optimizer) == (2, "muon")
    layer = Atlas(config, rngs=nnx.Rngs(4))
    poly = layer.poly
    assert poly is not None
    values = np.random.default_rng(1).uniform(0.2, 1.5, poly[...].shape)
    poly[...] = jnp.asarray(values, poly[...].dtype)
    x = inputs()
    y, _ = call(layer, x)
    tokens = memory_inputs(layer, x, streams(layer, x))
    o, _ = run_memory(layer, config, tokens)
    assert_close(y, read_out(layer, o, x), 1e-9, "ATLAS")


def rope(a, positions, base):
    """RoPE on ``a`` ``[B, T, H, D]``: pairs ``(a_i, a_{i+D/2})`` turned by ``p·base^{−2i/D}``."""
    half = a.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(half) / half)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    first, second = a[..., :half], a[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def attend(q, keys, values, visible):
    """Softmax attention ``[B, Q, H, ·]`` over ``keys`` ``[B, S, H, ·]`` where
    ``visible`` ``[Q, S]``, scale ``1/√K``."""
    scores = np.einsum("bqhk,bshk->bhqs", q, keys) / np.sqrt(q.shape[-1])
    scores = np.where(visible, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqs,bshv->bqhv", w / w.sum(-1, keepdims=True), values)


def persistent_kv(layer):
    p = np.asarray(layer.attention.persistent[...], np.float64)
    proj = layer.attention.projections
    return heads(p @ weights(proj["k"])), heads(p @ weights(proj["v"]))  # [P, H, ·]


def gated_read_out(layer, attention, memory):
    """``W_o · merge(RMSNorm_a(a) ⊙ σ(RMSNorm_m(o)))``."""
    head = layer.head
    a = rms_norm(attention, np.asarray(head.attention_norm.scale[...], np.float64))
    m = rms_norm(memory, np.asarray(head.memory_norm.scale[...], np.float64))
    return (a * sigmoid(m)).reshape(B, -1, a.shape[-2] * a.shape[-1]) @ weights(head.out)


def test_titans_mag_layer(x64):
    """Sliding-window attention (window W, persistent tokens, RoPE at the absolute
    position) gated by MAL's memory read of x."""
    window, persistent = 4, 3
    config = dataclasses.replace(
        MEMORY_CONFIG, titans_variant="mag", memory_window=window, persistent_tokens=persistent
    )
    layer = TitansMAG(config, rngs=nnx.Rngs(5))
    x = inputs()
    y, _ = call(layer, x)

    o, _ = run_memory(layer, config, memory_inputs(layer, x, streams(layer, x)))
    proj = layer.attention.projections
    positions = np.arange(T)
    qa = rope(heads(x @ weights(proj["q"])), positions, config.rope_theta)
    ka = rope(heads(x @ weights(proj["k"])), positions, config.rope_theta)
    va = heads(x @ weights(proj["v"]))
    pk, pv = persistent_kv(layer)
    keys = np.concatenate([np.broadcast_to(pk, (B,) + pk.shape), ka], 1)
    values = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape), va], 1)
    t, j = positions[:, None], positions[None, :]
    in_window = (j <= t) & (j > t - window)
    visible = np.concatenate([np.ones((T, persistent), bool), in_window], 1)
    attended = attend(qa, keys, values, visible)
    assert_close(y, gated_read_out(layer, attended, o), 1e-9, "Titans MAG")


def no_conv(layer, a):
    """MAC's memory streams of ỹ: ``SiLU(ỹ W_s)``, no convolution."""
    return {name: silu(a @ weights(layer.projections[name])) for name in ("q", "k", "v")}


def test_titans_mac_layer(x64):
    """Per segment of C tokens from the memory W_s at its start: h = M_{W_s}(q(x)),
    attention over [persistent, h (via W_c), segment tokens] (RoPE at the in-segment
    position), ỹ = merge(a) W_y, the memory learns from ỹ's q, k, v and gates,
    o_t = M_{W_t}(q(ỹ_t)), y = W_o · merge(RMSNorm_a(a) ⊙ σ(RMSNorm_m(o)))."""
    persistent, size = 2, MEMORY_CONFIG.chunk_size
    config = dataclasses.replace(MEMORY_CONFIG, titans_variant="mac", persistent_tokens=persistent)
    layer = TitansMAC(config, rngs=nnx.Rngs(6))
    x = inputs()
    y, state = call(layer, x)

    retrieval = l2(heads(streams(layer, x, ("q",))["q"]))  # conv on q only
    proj = layer.attention.projections
    pk, pv = persistent_kv(layer)
    depth = len(layer.memory)
    memory_state = None  # the reference's per-(b, h) (weights, momentum, window)
    weights_at = {
        (b, h): [np.asarray(w[...], np.float64)[h] for w in layer.memory]
        for b in range(B)
        for h in range(H)
    }
    attended, read, boundary = [], [], None
    for start in range(0, T, size):
        xs = x[:, start : start + size]
        n = xs.shape[1]
        local = np.arange(n)
        hs = np.array(
            [
                [
                    [mlp(weights_at[b, h], retrieval[b, start + i, h]) for h in range(H)]
                    for i in range(n)
                ]
                for b in range(B)
            ]
        )  # [B, n, H, V]: h = M_{W_s}(q)
        context = hs.reshape(B, n, -1) @ weights(layer.context_proj)
        kh = rope(heads(context @ weights(proj["k"])), local, config.rope_theta)
        vh = heads(context @ weights(proj["v"]))
        qa = rope(heads(xs @ weights(proj["q"])), local, config.rope_theta)
        ka = rope(heads(xs @ weights(proj["k"])), local, config.rope_theta)
        va = heads(xs @ weights(proj["v"]))
        keys = np.concatenate([np.broadcast_to(pk, (B,) + pk.shape), kh, ka], 1)
        values = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape), vh, va], 1)
        causal = local[None, :] <= local[:, None]
        visible = np.concatenate([np.ones((n, persistent), bool), causal, causal], 1)
        a = attend(qa, keys, values, visible)
        summary = a.reshape(B, n, -1) @ weights(layer.summary_proj)  # ỹ
        tokens = memory_inputs(layer, summary, no_conv(layer, summary))
        o, memory_state = run_memory(layer, config, tokens, state=memory_state)
        weights_at = {key: list(value[0]) for key, value in memory_state.items()}
        attended.append(a)
        read.append(o)
        if n == size:
            boundary = weights_at
    attended, read = np.concatenate(attended, 1), np.concatenate(read, 1)
    assert_close(y, gated_read_out(layer, attended, read), 1e-9, "Titans MAC")
    assert boundary is not None
    for l in range(depth):  # the memory at the last segment boundary (10 tokens)
        expected = np.stack([np.stack([boundary[b, h][l] for h in range(H)]) for b in range(B)])
        assert_close(state.memory[f"weight_{l}"], expected, 1e-9, f"MAC boundary weight_{l}")
