"""Logical axis names are checked (issue 24): an unknown name raises instead of
silently replicating that dimension, and every name the package's layers use is known."""

from __future__ import annotations

import re

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from xformjax import nn, parallel
from xformjax.models import LanguageModel, LMConfig
from xformjax.models.lm import ACTIVATION_AXES
from xformjax.parallel.mesh import LOGICAL_AXES

SIZES = {"data": 2, "fsdp": 2, "tensor": 2, "seq": 2}
KNOWN = "batch, length, embed, heads, kv, mlp, vocab"


def test_an_unknown_logical_name_raises_listing_the_known_names():
    spec = parallel.logical_to_spec
    with pytest.raises(ValueError) as caught:
        spec(("embed", "head"), (64, 32), SIZES)
    assert str(caught.value) == (
        "logical_to_spec: unknown logical axis name 'head' in ('embed', 'head'); "
        f"known names: {KNOWN} (or None: replicated)"
    )
    with pytest.raises(ValueError, match=re.escape("names 'Batch', 3 in ('Batch', 3)")):
        spec(("Batch", 3), (8, 8), SIZES)  # pyright: ignore[reportArgumentType]
    # under the active rules too (what constrain and state_shardings use)
    with parallel.axis_rules((("expert", "tensor"),)), pytest.raises(ValueError) as caught:
        spec(("experts",), (4,), SIZES)
    assert str(caught.value).endswith(f"known names: {KNOWN}, expert (or None: replicated)")
    # the package's names stay known under rules that leave them out (replicated);
    # a name the rules add is known under them
    custom = (("expert", "tensor"),)
    assert spec(("expert", "heads", None), (4, 8, 8), SIZES, custom) == PartitionSpec("tensor")
    assert spec(("vocab", "embed"), (8, 8), SIZES) == PartitionSpec("tensor", "fsdp")


#: every mixer once, then the options that add parameters, each on its own mixer
MODELS = [
    (",".join(nn.MIXERS), {}),
    ("titans", {"titans_variant": "mag"}),
    ("titans", {"titans_variant": "mac"}),
    ("linear_attn", {"feature_map": "hedgehog"}),
]


def _abstract_state(pattern: str, options: dict):
    config = LMConfig.preset(
        "tiny",
        num_layers=len(pattern.split(",")),
        layer_pattern=pattern,
        vocab_size=32,
        **{"mixer.d_model": 16, "mixer.num_heads": 2, "mixer.chunk_size": 8},
        **{f"mixer.{key}": value for key, value in options.items()},
    )
    return nnx.state(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))


def test_every_name_the_layers_use_is_known():
    """A language model with each mixer (and each option that adds parameters): every
    parameter's logical names are known, so placing it on a mesh cannot raise."""
    used: set = set(ACTIVATION_AXES)
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
    for pattern, options in MODELS:
        state = _abstract_state(pattern, options)
        parallel.state_shardings(state, mesh)  # logical_to_spec on every named variable
        variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        for variable in variables:
            used.update(variable.get_metadata().get("out_sharding") or ())
    assert used - {None} == set(LOGICAL_AXES)
