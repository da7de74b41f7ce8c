"""Norms, and the Pre-LN ≡ Pre-RMSNorm ≡ Pre-CRMSNorm equivalence of Jiang et al. 2023."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.ops.helpers import assert_close
from xformjax import nn

D, HIDDEN, VOCAB, LAYERS = 12, 20, 30, 3


def test_norms_match_their_formulas(x64):
    x = np.random.default_rng(0).standard_normal((4, D)) * 3 + 1
    rms = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    assert_close(nn.RMSNorm(D)(jnp.asarray(x)), rms, 1e-12, "RMSNorm")
    assert_close(nn.SRMSNorm()(jnp.asarray(x)), rms, 1e-12, "SRMSNorm")
    centred = x - x.mean(-1, keepdims=True)
    layer = centred / np.sqrt(np.var(x, -1, keepdims=True) + 1e-6)
    assert_close(nn.LayerNorm(D)(jnp.asarray(x)), layer, 1e-12, "LayerNorm")
    # CRMSNorm of the first D−1 entries of a zero-mean vector = RMSNorm of the vector
    crms = nn.CRMSNorm(D - 1)(jnp.asarray(centred[:, :-1]))
    assert_close(crms, nn.RMSNorm(D)(jnp.asarray(centred))[:, :-1], 1e-12, "CRMSNorm")
    assert nn.RMSNorm(D)(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def _pre_ln_model(rng):
    """A Pre-LN residual MLP stack: embeddings, LAYERS blocks, final LN, head."""

    def normal(*shape):
        return rng.standard_normal(shape)

    return {
        "embed": normal(VOCAB, D),
        "blocks": [
            {
                "gamma": 1 + 0.3 * normal(D),
                "beta": 0.3 * normal(D),
                "w1": normal(D, HIDDEN) / np.sqrt(D),
                "b1": 0.1 * normal(HIDDEN),
                "w2": normal(HIDDEN, D) / np.sqrt(HIDDEN),
                "b2": 0.1 * normal(D),
            }
            for _ in range(LAYERS)
        ],
        "final": {"gamma": 1 + 0.3 * normal(D), "beta": 0.3 * normal(D)},
        "head": normal(D, VOCAB) / np.sqrt(D),
    }


def _run(params, tokens, norm, *, affine):
    x = jnp.asarray(params["embed"])[tokens]
    for block in params["blocks"]:
        h = norm(x)
        if affine:
            h = h * block["gamma"] + block["beta"]
        x = x + jnp.maximum(h @ block["w1"] + block["b1"], 0) @ block["w2"] + block["b2"]
    h = norm(x)
    if affine:
        h = h * params["final"]["gamma"] + params["final"]["beta"]
    return h @ params["head"] + params.get("head_bias", 0.0)


def test_pre_ln_equals_pre_rmsnorm_equals_pre_crmsnorm(x64):
    rng = np.random.default_rng(0)
    params = _pre_ln_model(rng)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 9)))
    layer_norm = nn.LayerNorm(D, eps=1e-6)
    pre_ln = _run(params, tokens, layer_norm, affine=True)

    # Pre-RMSNorm: fold each LN's affine into the next linear map and keep the main
    # branch zero-mean (centred embeddings and centred outputs of every block).
    centre = np.eye(D) - np.ones((D, D)) / D
    rms_params = {
        "embed": params["embed"] @ centre,
        "blocks": [
            {
                "w1": b["gamma"][:, None] * b["w1"],
                "b1": b["beta"] @ b["w1"] + b["b1"],
                "w2": b["w2"] @ centre,
                "b2": b["b2"] @ centre,
            }
            for b in params["blocks"]
        ],
        "head": params["final"]["gamma"][:, None] * params["head"],
        "head_bias": params["final"]["beta"] @ params["head"],
    }
    pre_rms = _run(rms_params, tokens, nn.RMSNorm(D, eps=1e-6), affine=False)
    assert_close(pre_rms, pre_ln, 1e-10, "Pre-RMSNorm vs Pre-LN")

    # Pre-CRMSNorm: store the zero-mean residual by its first D−1 coordinates; a map
    # reading x uses W[:D−1] − W[D−1] (x_D = −Σ x̂), a map writing it drops column D.
    def reading(w):
        return w[:-1] - w[-1:]

    crms_params = {
        "embed": rms_params["embed"][:, :-1],
        "blocks": [
            {"w1": reading(b["w1"]), "b1": b["b1"], "w2": b["w2"][:, :-1], "b2": b["b2"][:-1]}
            for b in rms_params["blocks"]
        ],
        "head": reading(rms_params["head"]),
        "head_bias": rms_params["head_bias"],
    }
    pre_crms = _run(crms_params, tokens, nn.CRMSNorm(D - 1, eps=1e-6), affine=False)
    assert_close(pre_crms, pre_ln, 1e-10, "Pre-CRMSNorm vs Pre-LN")
