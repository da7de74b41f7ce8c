"""``MixerConfig`` checks every field at construction: ``ValueError`` for a bad value,
``TypeError`` for a wrong type, both naming the field, what it must be and what was
given (issue 24's rows first). The field checks themselves live in
:mod:`xformjax.fields`."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from xformjax import fields, nn

NAN, INF = float("nan"), float("inf")

# (field overrides, exception, the message after "MixerConfig: ")
BAD_VALUES = [
    # the table
    (dict(head_dim=0), ValueError, "`head_dim` must be an int ≥ 1 or None; got 0"),
    (dict(head_dim=-4), ValueError, "`head_dim` must be an int ≥ 1 or None; got -4"),
    (dict(num_kv_heads=0), ValueError, "`num_kv_heads` must be an int ≥ 1 or None; got 0"),
    (dict(num_kv_heads=-2), ValueError, "`num_kv_heads` must be an int ≥ 1 or None; got -2"),
    (dict(expand_v=NAN), ValueError, "`expand_v` must be a finite number > 0; got nan"),
    (dict(norm_eps=-1), ValueError, "`norm_eps` must be a finite number > 0; got -1"),
    (
        dict(dtype="int32"),
        ValueError,
        "`dtype` must be a floating dtype such as 'float32' or 'bfloat16'; got 'int32' (int32)",
    ),
    (dict(gate_temperature=0), ValueError, "`gate_temperature` must be a finite number > 0; got 0"),
    (dict(feature_dim=-3), ValueError, "`feature_dim` must be an int ≥ 1 or None; got -3"),
    # every other field
    (dict(d_model=0), ValueError, "`d_model` must be an int ≥ 1; got 0"),
    (dict(d_model=32.0), TypeError, "`d_model` must be an int ≥ 1; got 32.0 (float)"),
    (dict(num_heads=-1), ValueError, "`num_heads` must be an int ≥ 1; got -1"),
    (dict(num_heads=True), TypeError, "`num_heads` must be an int ≥ 1; got True (bool)"),
    (dict(head_dim="8"), TypeError, "`head_dim` must be an int ≥ 1 or None; got '8' (str)"),
    (dict(expand_v=0.0), ValueError, "`expand_v` must be a finite number > 0; got 0.0"),
    (dict(expand_v=INF), ValueError, "`expand_v` must be a finite number > 0; got inf"),
    (dict(expand_v="2"), TypeError, "`expand_v` must be a finite number > 0; got '2' (str)"),
    (dict(num_kv_heads=1.0), TypeError, "`num_kv_heads` must be an int ≥ 1 or None; got 1.0"),
    (dict(chunk_size=0), ValueError, "`chunk_size` must be an int ≥ 1; got 0"),
    (
        dict(mode="fast"),
        ValueError,
        "`mode` must be one of 'chunk', 'parallel', 'recurrent'; got 'fast'",
    ),
    (
        dict(mode=None),
        TypeError,
        "`mode` must be one of 'chunk', 'parallel', 'recurrent'; got None",
    ),
    (dict(dtype="float99"), ValueError, "`dtype` must be a floating dtype such as"),
    (dict(dtype=32), TypeError, "`dtype` must be a floating dtype such as 'float32' or 'bfloat16'"),
    (dict(param_dtype="int8"), ValueError, "`param_dtype` must be a floating dtype"),
    (dict(param_dtype=jnp.bool_), ValueError, "`param_dtype` must be a floating dtype"),
    (dict(sigma_reparam=1), TypeError, "`sigma_reparam` must be a bool; got 1 (int)"),
    (dict(output_gate="yes"), TypeError, "`output_gate` must be a bool; got 'yes' (str)"),
    (dict(norm_eps=0), ValueError, "`norm_eps` must be a finite number > 0; got 0"),
    (dict(norm_eps=NAN), ValueError, "`norm_eps` must be a finite number > 0; got nan"),
    (dict(max_seq_len=0), ValueError, "`max_seq_len` must be an int ≥ 1; got 0"),
    (dict(rope_theta=0.0), ValueError, "`rope_theta` must be a finite number > 0; got 0.0"),
    (dict(rope_theta=INF), ValueError, "`rope_theta` must be a finite number > 0; got inf"),
    (dict(window=0), ValueError, "`window` must be an int ≥ 1 or None; got 0"),
    (dict(window=2.5), TypeError, "`window` must be an int ≥ 1 or None; got 2.5 (float)"),
    (dict(sigmoid_bias=NAN), ValueError, "`sigmoid_bias` must be a finite number or None; got nan"),
    (dict(sigmoid_bias="x"), TypeError, "`sigmoid_bias` must be a finite number or None; got 'x'"),
    (dict(feature_map="cosine"), ValueError, "`feature_map` must be one of 'identity', 'elu+1',"),
    (dict(feature_dim=0), ValueError, "`feature_dim` must be an int ≥ 1 or None; got 0"),
    (dict(normalize="no"), TypeError, "`normalize` must be a bool; got 'no' (str)"),
    (dict(mala=0), TypeError, "`mala` must be a bool; got 0 (int)"),
    (
        dict(transnormer_attention="both"),
        ValueError,
        "`transnormer_attention` must be one of 'auto', 'norm', 'diag'; got 'both'",
    ),
    (dict(diag_block_size=0), ValueError, "`diag_block_size` must be an int ≥ 1; got 0"),
    (dict(gate_low_rank=-16), ValueError, "`gate_low_rank` must be an int ≥ 1; got -16"),
    (dict(gate_temperature=-2.0), ValueError, "`gate_temperature` must be a finite number > 0"),
    (dict(gate_temperature=None), TypeError, "`gate_temperature` must be a finite number > 0"),
    (dict(conv_size=-1), ValueError, "`conv_size` must be an int ≥ 0; got -1"),
    (dict(short_conv=1), TypeError, "`short_conv` must be a bool; got 1"),
    (dict(short_conv=True, conv_size=0), ValueError, "`short_conv` needs conv_size ≥ 1"),
    (dict(allow_neg_eigval=None), TypeError, "`allow_neg_eigval` must be a bool; got None"),
    (dict(num_householder=0), ValueError, "`num_householder` must be an int ≥ 1; got 0"),
    (dict(num_memories=0), ValueError, "`num_memories` must be an int ≥ 1; got 0"),
    (dict(top_k=0), ValueError, "`top_k` must be an int ≥ 1; got 0"),
    (dict(shared_memory="true"), TypeError, "`shared_memory` must be a bool; got 'true' (str)"),
    (dict(memory_depth=0), ValueError, "`memory_depth` must be an int ≥ 1; got 0"),
    (dict(memory_expansion=0), ValueError, "`memory_expansion` must be an int ≥ 1; got 0"),
    (
        dict(titans_variant="mam"),
        ValueError,
        "`titans_variant` must be one of 'mal', 'mag', 'mac'; got 'mam'",
    ),
    (dict(persistent_tokens=-1), ValueError, "`persistent_tokens` must be an int ≥ 0; got -1"),
    (dict(memory_window=0), ValueError, "`memory_window` must be an int ≥ 1; got 0"),
    (dict(omega_window=0), ValueError, "`omega_window` must be an int ≥ 1; got 0"),
    (dict(poly_degree=0), ValueError, "`poly_degree` must be an int ≥ 1; got 0"),
    (
        dict(memory_optimizer="adam"),
        ValueError,
        "`memory_optimizer` must be one of 'muon', 'momentum'; got 'adam'",
    ),
    (dict(newton_schulz_steps=0), ValueError, "`newton_schulz_steps` must be an int ≥ 1; got 0"),
    (dict(max_surprise_norm=0.0), ValueError, "`max_surprise_norm` must be a finite number > 0"),
    (dict(max_surprise_norm=INF), ValueError, "`max_surprise_norm` must be a finite number > 0"),
    (dict(max_surprise_norm=True), TypeError, "`max_surprise_norm` must be a finite number > 0"),
    # fields checked together
    (
        dict(d_model=10, num_heads=3),
        ValueError,
        "`d_model` must be divisible by num_heads=3 when head_dim is None; got 10",
    ),
    (
        dict(num_heads=3, num_kv_heads=2, head_dim=8),
        ValueError,
        "`num_kv_heads` must divide num_heads=3; got 2",
    ),
    (dict(num_memories=2, top_k=3), ValueError, "`top_k` must be ≤ num_memories=2; got 3"),
]


@pytest.mark.parametrize(
    "overrides, error, message", BAD_VALUES, ids=[str(case[0]) for case in BAD_VALUES]
)
def test_bad_field_is_rejected(overrides, error, message):
    with pytest.raises(error) as caught:
        nn.MixerConfig(**overrides)
    assert type(caught.value) is error
    assert str(caught.value).startswith(f"MixerConfig: {message}"), str(caught.value)


def test_every_field_has_a_bad_value_case_and_is_documented():
    names = {field.name for field in dataclasses.fields(nn.MixerConfig)}
    covered = {name for overrides, _, _ in BAD_VALUES for name in overrides}
    assert names - covered == set()
    doc = nn.MixerConfig.__doc__ or ""
    undocumented = [name for name in sorted(names) if not re.search(rf"\b{name}\b", doc)]
    assert undocumented == []


def test_good_values_are_kept():
    config = nn.MixerConfig(
        d_model=np.int64(24),  # pyright: ignore[reportArgumentType]
        num_heads=2,
        head_dim=6,
        expand_v=2,
        num_kv_heads=1,
        dtype=jnp.bfloat16,
        param_dtype=np.dtype("float32"),  # pyright: ignore[reportArgumentType]
        norm_eps=1e-5,
        window=3,
        sigmoid_bias=-2,
        conv_size=0,
        persistent_tokens=0,
        max_surprise_norm=None,
        feature_dim=4,
    )
    assert (config.key_dim, config.value_dim, config.kv_heads) == (6, 12, 1)
    assert config.compute_dtype == jnp.bfloat16 and config.params_dtype == jnp.float32
    # bounds of the field checks that MixerConfig does not use
    fields.check_float("X", "p", 1.0, at_least=0, at_most=1)
    with pytest.raises(ValueError, match=r"^X: `p` must be a finite number ≥ 0 and ≤ 1; got 1.5$"):
        fields.check_float("X", "p", 1.5, at_least=0, at_most=1)
