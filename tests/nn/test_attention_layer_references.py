"""Attention-like and linear-attention layers against float64 numpy written from their
docstrings (``xformjax/nn/*.py``, ``FAMILIES.md``), with the layers' own weights.

Every parameter is drawn afresh (norm scales away from one, biases away from zero,
Hedgehog's ``W_h`` away from the identity), so a dropped affine or a feature map that
ignores its weights cannot pass. The references are closed sums (``Σ_{j≤t}``, masked
``T × T`` scores) or the query-by-query attention of ``tests/ops/reference.py``.

Each layer is checked in chunk mode (several chunks, the last one partial). The other
forms and decoding from a state are checked against the chunk form (1e-4, float32) by
``tests/nn/test_mixers.py``; here one more form is checked only where the layer has
code of its own for it (DiagAttention's token-by-token path): every compilation costs
about half a second of CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_layer_references import inputs, rms_norm, silu, weights
from tests.ops import reference
from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.ops.common.validation import Mode

D, T = 24, 13
BASE = nn.MixerConfig(
    d_model=D, num_heads=2, chunk_size=5, max_seq_len=16, dtype="float64", param_dtype="float64"
)
TOL = 1e-12  # float64 rounding here is ~3e-16


def build(name: str, *, layer_index: int = 0, num_layers: int = 1, **overrides) -> Any:
    """The mixer ``name`` with every parameter drawn afresh, ``N(0, 0.3²)`` around 0
    (projections, biases), 1 (norm scales) or the identity (Hedgehog's ``W_h``), so no
    scale is one, no bias zero and no ``W_h`` the identity (built abstractly: the
    layer's own initialisation would compile an op per new shape)."""
    config = dataclasses.replace(BASE, **overrides)
    layer = nnx.eval_shape(
        lambda: nn.MIXERS[name](
            config, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(0)
        )
    )
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        where = jax.tree_util.keystr(path)
        centre = (
            1.0
            if "['scale']" in where
            else np.eye(leaf.shape[-1])
            if "['feature_map']['weight']" in where
            else 0.0
        )
        return jnp.asarray(centre + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

    params = nnx.state(layer, nnx.Param)
    nnx.update(layer, jax.tree_util.tree_map_with_path(draw, params))
    assert not any(  # nothing abstract is left
        isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(layer))
    )
    return layer


#: XLA:CPU's optimisation passes cost more compile time than these tiny programs run
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run(layer: nn.Mixer, x: np.ndarray, mode: Mode) -> np.ndarray:
    """``layer(x, mode=mode)``'s output, compiled as one program (cheaper than op-by-op
    dispatch)."""
    graphdef, params = nnx.split(layer)

    def call(params, x):
        return nnx.merge(graphdef, params)(x, mode=mode)[0]

    return np.asarray(jax.jit(call, compiler_options=FAST_COMPILE)(params, jnp.asarray(x)))


def check(
    layer: nn.Mixer, x: np.ndarray, expected: np.ndarray, what: str, *, also: Mode | None = None
):
    """The output in chunk mode (several chunks, the last one partial) and in ``also``."""
    for mode in ("chunk",) + ((also,) if also else ()):
        y = run(layer, x, mode)
        assert_close(y, expected, TOL, f"{what} ({mode})")


def param(module_attribute) -> np.ndarray:
    return np.asarray(module_attribute[...], np.float64)


def split(a: np.ndarray, num_heads: int) -> np.ndarray:
    return a.reshape(*a.shape[:-1], num_heads, -1)


def merge(a: np.ndarray) -> np.ndarray:
    return a.reshape(*a.shape[:-2], -1)


def rope(a: np.ndarray, base: float) -> np.ndarray:
    """RoFormer's rotation of the pairs ``(a_i, a_{i+D/2})`` by ``p·θ_i``,
    ``θ_i = base^{−2i/D}``, at positions ``p = 0 … T−1`` (``a`` ``[B, T, H, D]``)."""
    dim = a.shape[-1]
    theta = base ** (-2.0 * np.arange(dim // 2) / dim)
    angles = np.arange(a.shape[1])[:, None, None] * theta
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = a[..., : dim // 2], a[..., dim // 2 :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def prefix_sums(a: np.ndarray) -> np.ndarray:
    """``Σ_{j≤t} a_j`` over the token axis (1)."""
    return np.cumsum(a, axis=1)


def causal_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``q_tᵀ k_j`` for ``j ≤ t`` (0 above the diagonal): ``[B, H, T, T]``."""
    scores = np.einsum("bthd,bjhd->bhtj", q, k)
    return scores * np.tril(np.ones((q.shape[1], k.shape[1])))


# ------------------------------------------------------------------ softmax / sigmoid


#: 4 query heads on 2 kv heads (query heads 0, 1 read kv head 0), a window of 8 of the 13
#: tokens (the first 8 queries see every earlier key, the last 5 do not), RoPE base 300.
GQA_WINDOW = {"num_heads": 4, "num_kv_heads": 2, "window": 8, "rope_theta": 300.0}


def attention_reference(layer, x, **kwargs) -> np.ndarray:
    """``W_o · merge(o)``, ``o`` the attention of ``RoPE(x W_q)``, ``RoPE(x W_k)``,
    ``x W_v`` (``kwargs``: the kind and bias of :func:`reference.attention`)."""
    config = layer.config
    q = rope(split(x @ weights(layer.q_proj), config.num_heads), config.rope_theta)
    k = rope(split(x @ weights(layer.k_proj), config.kv_heads), config.rope_theta)
    v = split(x @ weights(layer.v_proj), config.kv_heads)
    o, _ = reference.attention(q, k, v, window=config.window, **kwargs)
    return merge(o) @ weights(layer.o_proj)


def test_softmax_attention_layer(x64):
    layer = build("attn", **GQA_WINDOW)
    x = inputs()
    check(layer, x, attention_reference(layer, x), "attn")


def test_sigmoid_attention_layer_default_bias(x64):
    """``b_i = 1 − log n_i``, ``n_i = min(i + 1, window)`` the keys query ``i`` sees."""
    layer = build("sigmoid_attn", **GQA_WINDOW)
    x = inputs()
    visible = np.minimum(np.arange(1, T + 1), GQA_WINDOW["window"])
    expected = attention_reference(layer, x, kind="sigmoid", bias=1.0 - np.log(visible))
    check(layer, x, expected, "sigmoid_attn default bias")


def test_sigmoid_attention_layer_explicit_bias(x64):
    """``config.sigmoid_bias`` replaces the default for every query (no window here)."""
    layer = build("sigmoid_attn", sigmoid_bias=-1.7)
    x = inputs()
    expected = attention_reference(layer, x, kind="sigmoid", bias=-1.7)
    check(layer, x, expected, "sigmoid_attn bias −1.7")


# ------------------------------------------------------------------ linear attention


def feature_map(kind: str, a: np.ndarray, layer) -> np.ndarray:
    """φ of ``xformjax/nn/feature_maps.py``'s docstring on ``[B, T, H, d]``."""
    if kind == "identity":
        return a
    if kind == "elu+1":
        return np.where(a > 0, a + 1, np.exp(a))
    if kind == "relu":
        return np.maximum(a, 0)
    if kind == "hedgehog":
        projected = np.einsum("bthd,hde->bthe", a, param(layer.feature_map.weight))

        def softmax(s):
            e = np.exp(s - s.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        return np.concatenate([softmax(projected), softmax(-projected)], -1)
    assert kind == "taylor"
    dim = a.shape[-1]
    outer = np.einsum("...i,...j->...ij", a, a).reshape(*a.shape[:-1], dim * dim)
    return np.concatenate(
        [np.ones(a.shape[:-1] + (1,)), a / dim**0.25, outer / np.sqrt(2 * dim)], -1
    )


def gate_and_project(layer, o: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W_o · (SiLU(x W_g) ⊙ merge(o))``."""
    return (merge(o) * silu(x @ weights(layer.head.gate))) @ weights(layer.head.out)


def linear_features(layer, x):
    heads = layer.config.num_heads
    kind = layer.config.feature_map
    q, k, v = (split(x @ weights(p), heads) for p in (layer.qkv.q, layer.qkv.k, layer.qkv.v))
    return feature_map(kind, q, layer), feature_map(kind, k, layer), v


LINEAR_CASES = {
    "identity": {"feature_map": "identity"},
    "elu+1": {"feature_map": "elu+1"},
    "relu-feature_dim-8": {"feature_map": "relu", "feature_dim": 8},
    "hedgehog-feature_dim-6": {"feature_map": "hedgehog", "feature_dim": 6},
    "taylor-feature_dim-4": {"feature_map": "taylor", "feature_dim": 4},
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_attention_layer(x64, case):
    """``o_t = s·S_tᵀφ(q_t)``, ``S_t = Σ_{j≤t} φ(k_j)v_jᵀ``, ``y = W_o(gate ⊙ RMSNorm(o))``;
    ``s = K^{−1/2}`` (K the width of φ), 1 for Hedgehog and Taylor, whose φ already
    carries the temperature (``φ(q)ᵀφ(k) ≈ exp(qᵀk/√d)``)."""
    layer = build("linear_attn", **LINEAR_CASES[case])
    x = inputs()
    q, k, v = linear_features(layer, x)
    width = q.shape[-1]
    assert width == layer.feature_map.output_dim
    scale = 1.0 if layer.config.feature_map in ("hedgehog", "taylor") else width**-0.5
    o = scale * np.einsum("bhtj,bjhv->bthv", causal_scores(q, k), v)
    normed = rms_norm(o, param(layer.head.norm.scale))
    expected = gate_and_project(layer, normed, x)
    check(layer, x, expected, f"linear_attn {case}")


def test_linear_attention_layer_normalized(x64):
    """``o_t = s·S_tᵀφ(q_t) / (s·φ(q_t)ᵀz_t + ε)``, ε = 1e-6, no RMSNorm (the layer's
    docstring omits ``s``; the op's, ``ops.linear_attention``, states it)."""
    layer = build("linear_attn", feature_map="elu+1", feature_dim=8, normalize=True)
    x = inputs()
    q, k, v = linear_features(layer, x)
    scale = q.shape[-1] ** -0.5
    scores = scale * causal_scores(q, k)
    numerator = np.einsum("bhtj,bjhv->bthv", scores, v)
    denominator = np.einsum("bhtj->bth", scores)[..., None] + 1e-6
    expected = gate_and_project(layer, numerator / denominator, x)
    check(layer, x, expected, "linear_attn normalize")


def test_linear_attention_layer_mala(x64):
    """MALA: ``o_t = β_t S_tᵀφ(q_t) − γ_t Σ_{j≤t} v_j``, ``β_t = 1 + 1/(φ(q_t)ᵀz_t + ε)``,
    ``γ_t = φ(q_t)ᵀz_t / t`` (t counted from 1), so the weights ``β q_tᵀk_j − γ`` sum
    to one; no RMSNorm, no scale. (ε = 1e-6 is the layer's ``_EPS``.)"""
    layer = build("linear_attn", feature_map="relu", feature_dim=8, mala=True)
    x = inputs()
    q, k, v = linear_features(layer, x)
    scores = causal_scores(q, k)
    score = np.einsum("bhtj->bth", scores)[..., None]  # φ(q_t)ᵀ z_t
    beta = 1 + 1 / (score + 1e-6)
    gamma = score / np.arange(1, T + 1)[None, :, None, None]
    mixing = beta.transpose(0, 2, 1, 3) * scores - gamma.transpose(0, 2, 1, 3)
    mixing = mixing * np.tril(np.ones((T, T)))
    # the weights sum to one (up to ε: s/(s + ε))
    np.testing.assert_allclose(
        mixing.sum(-1), (score / (score + 1e-6)).transpose(0, 2, 1, 3)[..., 0], rtol=1e-12
    )
    o = np.einsum("bhtj,bjhv->bthv", mixing, v)
    expected = gate_and_project(layer, o, x)
    check(layer, x, expected, "linear_attn mala")


# ------------------------------------------------------------------ TransNormer


def test_transnormer_norm_and_diag_attention(x64):
    """``transnormer_attention="auto"`` over 2 layers: layer 0 is DiagAttention, layer 1
    NormAttention.

    - DiagAttention: causal softmax (scale 1/√D) inside blocks of ``diag_block_size``
      tokens (here 5: blocks 0–4, 5–9, 10–12), ``y = W_o · merge(o)``;
    - NormAttention: ``o_t = RMSNorm(s·S_tᵀφ(q_t))``, ``S_t = Σ_{j≤t} φ(k_j)v_jᵀ``,
      φ = elu+1, ``y = W_o · merge(o)`` (no gate: the family has none).
    """
    x = inputs()
    block = 5
    diag = build("transnormer", layer_index=0, num_layers=2, diag_block_size=block)
    norm = build("transnormer", layer_index=1, num_layers=2, diag_block_size=block)
    assert diag.diag and not norm.diag

    q, k, v = (split(x @ weights(p), 2) for p in (diag.qkv.q, diag.qkv.k, diag.qkv.v))
    logits = np.einsum("bthd,bjhd->bhtj", q, k) / np.sqrt(q.shape[-1])
    blocks = np.arange(T) // block
    visible = (blocks[:, None] == blocks[None, :]) & np.tril(np.ones((T, T), bool))
    logits = np.where(visible, logits, -np.inf)
    attention = np.exp(logits - logits.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    o = np.einsum("bhtj,bjhv->bthv", attention, v)
    expected = merge(o) @ weights(diag.head.out)
    check(diag, x, expected, "transnormer DiagAttention", also="recurrent")

    q, k, v = (split(x @ weights(p), 2) for p in (norm.qkv.q, norm.qkv.k, norm.qkv.v))
    q, k = feature_map("elu+1", q, norm), feature_map("elu+1", k, norm)
    o = q.shape[-1] ** -0.5 * np.einsum("bhtj,bjhv->bthv", causal_scores(q, k), v)
    expected = merge(rms_norm(o, param(norm.head.norm.scale))) @ weights(norm.head.out)
    check(norm, x, expected, "transnormer NormAttention")


# ------------------------------------------------------------------ LightNet


def test_lightnet_layer(x64):
    """``S_t = Σ_{j≤t} exp(k_j) v_jᵀ / z_t``, ``z_t = Σ_{j≤t} exp(k_j)`` per key channel,
    ``o_t = S_tᵀq_t/√K``, ``q = SiLU(x W_q)``, ``y = W_o(SiLU(x W_g) ⊙ RMSNorm(o))``."""
    layer = build("lightnet")
    x = inputs()
    q, k, v = (split(x @ weights(p), 2) for p in (layer.qkv.q, layer.qkv.k, layer.qkv.v))
    q = silu(q)
    numerator = prefix_sums(np.exp(k)[..., :, None] * v[..., None, :])  # [B, T, H, K, V]
    state = numerator / prefix_sums(np.exp(k))[..., None]
    o = np.einsum("bthkv,bthk->bthv", state, q) / np.sqrt(q.shape[-1])
    normed = rms_norm(o, param(layer.head.norm.scale))
    expected = gate_and_project(layer, normed, x)
    check(layer, x, expected, "lightnet")


# ------------------------------------------------------------------ RetNet


def test_retnet_layer_output(x64):
    """Parallel retention ``o = (QKᵀ ⊙ D)V/√D``, ``D_tj = γ_h^{t−j}`` (j ≤ t),
    ``γ_h = 1 − 2^{−5−h}``, RoPE on q and k (base ``rope_theta``);
    ``y = W_o(SiLU(x W_g) ⊙ GroupNorm(o))``, the GroupNorm a LayerNorm over each
    head's V features with one affine scale and bias shared by the heads. Values twice
    as wide as keys (``expand_v=2``, the paper's choice)."""
    layer = build("retnet", expand_v=2.0, rope_theta=500.0)
    x = inputs()
    q, k, v = (split(x @ weights(p), 2) for p in (layer.qkv.q, layer.qkv.k, layer.qkv.v))
    q, k = rope(q, 500.0), rope(k, 500.0)
    assert v.shape[-1] == 2 * q.shape[-1]
    gamma = 1 - 2.0 ** (-5.0 - np.arange(2))
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    decay = np.where(distance >= 0, gamma[:, None, None] ** np.maximum(distance, 0), 0.0)
    scores = np.einsum("bthd,bjhd->bhtj", q, k) * decay / np.sqrt(q.shape[-1])
    o = np.einsum("bhtj,bjhv->bthv", scores, v)
    centred = o - o.mean(-1, keepdims=True)
    normed = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + layer.config.norm_eps)
    normed = normed * param(layer.head.norm.scale) + param(layer.head.norm.bias)
    expected = gate_and_project(layer, normed, x)
    check(layer, x, expected, "retnet")
