"""The README's example and the ops' docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_every_example():
    assert len(BLOCKS) == 9


def test_readme_op_example_runs():
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md", "exec"), namespace)
    assert namespace["states"].shape == (3, 4, 64, 64)


def test_readme_value_check_example_raises_eagerly_and_under_jit():
    import xformjax

    namespace: dict = {}
    try:
        exec(compile(BLOCKS[1], "README.md", "exec"), namespace)
    finally:
        xformjax.config.update("check_values", False)
    for error in (namespace["eager_error"], namespace["jit_error"]):
        assert error.startswith("linear_attention: `g` ") and "log decays" in error, error


def test_readme_layer_example_runs():
    namespace: dict = {}
    exec(compile(BLOCKS[2], "README.md", "exec"), namespace)
    assert namespace["y_next"].shape == (2, 1, 128)
    assert namespace["y"].shape == (2, 300, 128)


def test_readme_model_example_runs():
    import jax.numpy as jnp

    namespace: dict = {}
    exec(compile(BLOCKS[3], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 64, 256)
    assert namespace["tokens"].shape == (2, 16)
    # the packed-documents example continues it
    exec(compile(BLOCKS[4], "README.md", "exec"), namespace)
    assert namespace["packed"].shape == (2, 8, 256)
    assert float(jnp.abs(namespace["packed"][:1, 3:7] - namespace["alone"]).max()) < 1e-4
    # so does the generation example
    exec(compile(BLOCKS[5], "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.tokens.shape == (2, 32)
    assert all(1 <= int(n) <= 32 for n in result.lengths)
    assert [len(row) for row in result.sequences()] == [int(n) for n in result.lengths]
    assert len(namespace["texts"]) == 2


def test_readme_training_at_scale_example_runs():
    import jax.numpy as jnp

    namespace: dict = {}
    exec(compile(BLOCKS[6], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (1, 16, 256)
    assert namespace["logits"].dtype == jnp.float32
    assert namespace["model"].stacks[0].mlp.up.kernel.shape == (2, 64, 176)


def test_readme_sharding_example_runs():
    from jax.sharding import PartitionSpec

    namespace: dict = {}
    exec(compile(BLOCKS[7], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 64, 256)
    assert namespace["model"].embedding[...].sharding.spec == PartitionSpec(None, "fsdp")


def test_readme_kernel_example_lowers_for_tpu_and_gpu():
    namespace: dict = {}
    exec(compile(BLOCKS[8], "README.md", "exec"), namespace)
    assert "tpu_custom_call" in namespace["tpu"].as_text()
    assert "xla.gpu.triton" in namespace["gpu"].as_text()


@pytest.mark.parametrize(
    "module",
    [
        "xformjax.ops.linear_attention",
        "xformjax.ops.softmax_attention",
        "xformjax.nn",
        "xformjax.nn.linen",
        "xformjax.models",
        "xformjax.models.config",
        "xformjax.data",
        "xformjax.ops.mixture_of_memories",
        "xformjax.ops.aaren",
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, result
