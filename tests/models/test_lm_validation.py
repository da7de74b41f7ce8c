"""The language model's input contract: token ids in ``[0, vocab)`` (eagerly always,
under ``jit`` with ``check_values`` on, and nothing added to the traced program with it
off), integer ``[B, T]`` tokens, and ``LMConfig`` checked field by field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xformjax
from xformjax import models, nn
from xformjax.models import lm

VOCAB = 13
CONFIG = models.LMConfig(
    vocab_size=VOCAB,
    num_layers=1,
    layer_pattern="attn",
    mlp_hidden=8,
    mixer=nn.MixerConfig(d_model=8, num_heads=2, chunk_size=4, max_seq_len=8),
)
GOOD = np.array([[0, 5, 12], [3, 1, 2]], np.int32)
RANGE = r"LanguageModel: `tokens` must be token ids in \[0, vocab_size=13\); got "


@pytest.fixture(scope="module")
def model():
    return models.LanguageModel(CONFIG, rngs=nnx.Rngs(0))


def jitted_logits(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    return lambda tokens: logits(state, tokens)


def with_token(value, where=(1, 2)):
    tokens = GOOD.copy()
    tokens[where] = value
    return tokens


@pytest.mark.parametrize("value", [VOCAB, 253, -1])
def test_eager_token_out_of_range(model, value):
    # (the value is printed as numpy prints it: "253" or "np.int32(253)")
    shown = rf"(np\.int32\()?{value}\)?"
    with pytest.raises(
        ValueError, match=RANGE + shown + r" at index \(1, 2\) \(1 of 6 values fail\)$"
    ):
        model(jnp.asarray(with_token(value)))


def test_jit_token_check_with_the_switch(model):
    call = jitted_logits(model)
    # switch off (the default): nothing is checked, an out-of-range id reads a NaN row
    expected = np.asarray(call(jnp.asarray(GOOD)))
    logits = np.asarray(call(jnp.asarray(with_token(VOCAB))))
    assert np.isnan(logits[1, 2]).all() and np.isfinite(logits[0]).all()
    np.testing.assert_array_equal(logits[0], expected[0])
    with xformjax.config.override("check_values", True):
        checked = xformjax.config.checked(call)
        np.testing.assert_allclose(checked(jnp.asarray(GOOD)), expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match=RANGE + r"values in \[0, 13\]$"):
            checked(jnp.asarray(with_token(VOCAB)))
        with pytest.raises(ValueError, match=RANGE + r"values in \[-4, 12\]$"):
            checked(jnp.asarray(with_token(-4, (0, 0))))


def test_switch_off_adds_nothing_to_the_trace(model, monkeypatch):
    graphdef, state = nnx.split(model)

    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    traced = str(jax.make_jaxpr(logits)(state, jnp.asarray(GOOD)))
    monkeypatch.setattr(lm, "check_values", lambda *args, **kwargs: None)
    assert str(jax.make_jaxpr(logits)(state, jnp.asarray(GOOD))) == traced


@pytest.mark.parametrize(
    "tokens, error, message",
    [
        (np.zeros((2, 3), np.float32), TypeError, r"\(an integer dtype\); got float32\[2, 3\]$"),
        (np.zeros((2, 3), bool), TypeError, r"\(an integer dtype\); got bool\[2, 3\]$"),
        ([[1, 2, 3]], TypeError, r"\(an integer array\); got list$"),
        (np.zeros((3,), np.int32), ValueError, r"\(rank 2\); got int32\[3\]$"),
        (np.zeros((1, 2, 3), np.int32), ValueError, r"\(rank 2\); got int32\[1, 2, 3\]$"),
    ],
)
def test_token_type_and_rank(model, tokens, error, message):
    with pytest.raises(error, match=r"^LanguageModel: `tokens` must be int \[B, T\] " + message):
        model(tokens)


# (LMConfig overrides, exception, the message after "LMConfig: ")
BAD_CONFIGS = [
    (dict(vocab_size=0), ValueError, "`vocab_size` must be an int ≥ 1; got 0"),
    (dict(vocab_size=256.0), TypeError, "`vocab_size` must be an int ≥ 1; got 256.0 (float)"),
    (dict(num_layers=-2), ValueError, "`num_layers` must be an int ≥ 1; got -2"),
    (dict(num_layers=True), TypeError, "`num_layers` must be an int ≥ 1; got True (bool)"),
    (
        dict(layer_pattern="gdn,mamba"),
        ValueError,
        "`layer_pattern` must list registered mixer names; got 'gdn,mamba': unknown mixer 'mamba'",
    ),
    (
        dict(layer_pattern="attn,,gdn"),
        ValueError,
        "`layer_pattern` must list registered mixer names; got 'attn,,gdn': empty mixer name",
    ),
    (
        dict(layer_pattern=["attn"]),
        TypeError,
        "`layer_pattern` must be a comma-separated string of mixer names; got ['attn'] (list)",
    ),
    (dict(mixer={"d_model": 8}), TypeError, "`mixer` must be a MixerConfig; got dict"),
    (
        dict(layer_pattern="gdn,attn", mixer=nn.MixerConfig(short_conv=True)),
        ValueError,
        "`mixer.short_conv` is an option of gla, linear_attn, retnet; no layer of "
        "layer_pattern 'gdn,attn' has it",
    ),
    (dict(mlp="relu"), ValueError, "`mlp` must be one of 'swiglu', 'glu', 'gelu'; got 'relu'"),
    (dict(mlp_hidden=0), ValueError, "`mlp_hidden` must be an int ≥ 1 or None; got 0"),
    (dict(norm="batch"), ValueError, "`norm` must be one of 'rms', 'layer', 'srms'; got 'batch'"),
    (dict(norm=None), TypeError, "`norm` must be one of 'rms', 'layer', 'srms'; got None"),
    (dict(norm_placement="post"), ValueError, "`norm_placement` must be one of 'pre', 'peri'"),
    (dict(tie_embeddings="no"), TypeError, "`tie_embeddings` must be a bool; got 'no' (str)"),
    (dict(embed_std=0.0), ValueError, "`embed_std` must be a finite number > 0 or None; got 0.0"),
    (dict(embed_std=True), TypeError, "`embed_std` must be a finite number > 0 or None; got True"),
    (dict(embed_scale=float("nan")), ValueError, "`embed_scale` must be a finite number > 0"),
    (dict(embed_scale=-1), ValueError, "`embed_scale` must be a finite number > 0 or None; got -1"),
    (dict(remat="all"), ValueError, "`remat` must be one of 'none', 'full', 'dots'"),
    (dict(scan_layers=1), TypeError, "`scan_layers` must be a bool; got 1 (int)"),
]


@pytest.mark.parametrize(
    "overrides, error, message", BAD_CONFIGS, ids=[str(case[0]) for case in BAD_CONFIGS]
)
def test_lm_config_field_is_checked(overrides, error, message):
    with pytest.raises(error) as caught:
        dataclasses.replace(CONFIG, **overrides)
    assert type(caught.value) is error
    assert str(caught.value).startswith(f"LMConfig: {message}"), str(caught.value)


def test_every_lm_config_field_has_a_bad_value_case():
    names = {field.name for field in dataclasses.fields(models.LMConfig)}
    assert names - {name for overrides, _, _ in BAD_CONFIGS for name in overrides} == set()
