"""``LanguageModel.__call__`` against an independent float64 numpy forward written from
the docstrings (:mod:`xformjax.models.lm`, :mod:`xformjax.nn.deltanet`,
:mod:`xformjax.nn.attention`, :mod:`xformjax.nn.mlp`, :mod:`xformjax.nn.norms`):

    h_0 = s · E[tokens]
    h_l = h_{l-1} + N'(mixer_l(N(h_{l-1})));  h_l = h_l + N'(MLP_l(N(h_l)))
    logits = N(h_L) Eᵀ   (or W_out)

with a gated DeltaNet layer (short convolutions, L2-normalised q/k, β = σ(x W_β), the
Mamba-2 decay, the delta-rule recurrence token by token, the gated RMSNorm read-out)
and a softmax-attention layer (RoPE, causal softmax). No parameter keeps its initial
value (norm scales of one, zero biases would hide a missing term): the weights are
random and read out of the nnx model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_layer_references import causal_conv, silu, weights
from tests.ops.helpers import assert_close
from xformjax import models, nn

VOCAB, D, H, T, BATCH = 13, 8, 2, 7, 2
MIXER = nn.MixerConfig(
    d_model=D,
    num_heads=H,
    chunk_size=4,
    conv_size=3,
    max_seq_len=8,
    dtype="float64",
    param_dtype="float64",
    norm_eps=1e-5,
)


def param(p) -> np.ndarray:
    return np.asarray(p[...], np.float64)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def split(a):
    """``[B, T, H·D]`` → ``[B, T, H, D]``."""
    return a.reshape(*a.shape[:-1], H, -1)


def norm(module, x, eps):
    """RMSNorm ``γ ⊙ x/rms(x)`` or LayerNorm ``γ ⊙ (x − μ)/σ + b`` over the last axis."""
    if isinstance(module, nn.LayerNorm):
        centred = x - x.mean(-1, keepdims=True)
        scaled = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
        return scaled * param(module.scale) + param(module.bias)
    assert isinstance(module, nn.RMSNorm)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * param(module.scale)


def gated_deltanet(layer, x, eps):
    """``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t / √K``,
    ``y = W_o (SiLU(x W_g) ⊙ RMSNorm(o))``."""
    streams = {
        name: silu(causal_conv(x @ weights(layer.projections[name]), layer.convs[name]))
        for name in ("q", "k", "v")
    }

    def unit(a):
        return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)

    q, k, v = unit(split(streams["q"])), unit(split(streams["k"])), split(streams["v"])
    beta = sigmoid(x @ weights(layer.beta_proj))  # [B, T, H]
    softplus = np.logaddexp(0, x @ weights(layer.gate_proj) + param(layer.dt_bias))
    decay = np.exp(-np.exp(param(layer.a_log)) * softplus)  # [B, T, H]
    key_dim = q.shape[-1]
    o = np.zeros(v.shape)
    for b in range(x.shape[0]):
        for h in range(H):
            state = np.zeros((key_dim, v.shape[-1]))
            for t in range(x.shape[1]):
                kt, vt, bt = k[b, t, h], v[b, t, h], beta[b, t, h]
                state = decay[b, t, h] * (state - bt * np.outer(kt, kt @ state))
                state = state + bt * np.outer(kt, vt)
                o[b, t, h] = state.T @ q[b, t, h] / math.sqrt(key_dim)
    normed = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * param(layer.head.norm.scale)
    gated = normed.reshape(*x.shape[:2], -1) * silu(x @ weights(layer.head.gate))
    return gated @ weights(layer.head.out)


def rope(a, theta):
    """Rotate the pairs ``(a_i, a_{i+D/2})`` of ``a`` ``[B, T, H, D]`` by ``t·θ^{−2i/D}``."""
    dim = a.shape[-1]
    angles = np.arange(a.shape[1])[:, None, None] * theta ** (-2 * np.arange(dim // 2) / dim)
    first, second = a[..., : dim // 2], a[..., dim // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def attention(layer, x, theta):
    """``o_i = Σ_{j ≤ i} softmax_j(q_i·k_j/√D) v_j``, ``y = W_o merge(o)``."""
    q = rope(split(x @ weights(layer.q_proj)), theta)
    k = rope(split(x @ weights(layer.k_proj)), theta)
    v = split(x @ weights(layer.v_proj))
    scores = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((x.shape[1], x.shape[1]), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", w, v)
    return o.reshape(*x.shape[:2], -1) @ weights(layer.o_proj)


def mlp(module, x):
    """swiglu ``W_2 (x W_1 ⊙ SiLU(x W_3))``, glu with σ, gelu ``W_2 GELU(x W_1)`` (tanh form)."""
    up = x @ weights(module.up)
    if module.kind == "gelu":
        h = 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
    else:
        gate = x @ weights(module.gate)
        h = up * (silu(gate) if module.kind == "swiglu" else sigmoid(gate))
    return h @ weights(module.down)


def forward(model: models.LanguageModel, tokens: np.ndarray) -> np.ndarray:
    config = model.config
    eps, theta = config.mixer.norm_eps, config.mixer.rope_theta
    embedding = param(model.embedding)
    scale = math.sqrt(D) if config.embed_scale is None else config.embed_scale
    h = scale * embedding[tokens]
    for block, name in zip(model.blocks, config.layer_names(), strict=True):
        x = norm(block.mixer_norm, h, eps)
        if name == "gated_deltanet":
            y = gated_deltanet(block.mixer, x, eps)
        else:
            assert name == "attn"
            y = attention(block.mixer, x, theta)
        if config.norm_placement == "peri":
            y = norm(block.mixer_out_norm, y, eps)
        h = h + y
        y = mlp(block.mlp, norm(block.mlp_norm, h, eps))
        if config.norm_placement == "peri":
            y = norm(block.mlp_out_norm, y, eps)
        h = h + y
    h = norm(model.final_norm, h, eps)
    head = embedding.T if config.tie_embeddings else weights(model.lm_head)
    return h @ head


CONFIGS = {
    "tied-pre-rms-swiglu": models.LMConfig(
        vocab_size=VOCAB, num_layers=2, layer_pattern="gdn,attn", mixer=MIXER
    ),
    "untied-peri-layer-gelu": models.LMConfig(
        vocab_size=VOCAB,
        num_layers=2,
        layer_pattern="attn,gdn",
        mixer=MIXER,
        mlp="gelu",
        mlp_hidden=12,
        norm="layer",
        norm_placement="peri",
        tie_embeddings=False,
        embed_scale=1.5,
    ),
}


def random_parameters(config: models.LMConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure (built abstractly: no initialisation to run) with random
    parameters: matrices ``N(0, 1/fan_in)``, norm scales ``1 + N(0, 0.3²)``, other
    vectors (biases, gate parameters) ``N(0, 0.5²)``."""
    abstract = nnx.eval_shape(lambda: models.LanguageModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        if len(leaf.shape) == 2:
            value = noise / math.sqrt(leaf.shape[0])
        elif "scale" in jax.tree_util.keystr(path):
            value = 1 + 0.3 * noise
        else:
            value = 0.5 * noise
        return jnp.asarray(value, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, state)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_language_model_matches_numpy(x64, name):
    graphdef, state = random_parameters(CONFIGS[name])
    tokens = np.random.default_rng(2).integers(0, VOCAB, (BATCH, T))
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32  # float64 inside, float32 logits out
    expected = forward(nnx.merge(graphdef, state), tokens)
    assert_close(logits, expected, 1e-7, f"language model ({name})")
