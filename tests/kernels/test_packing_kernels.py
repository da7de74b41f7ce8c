"""Packed documents stay apart through the Pallas kernels (interpret mode, on the CPU).

A layer keeps packed documents apart with a reset gate of ``RESET_LOG_GATE`` (−1e30)
at each document's first token (:mod:`xformjax.nn.packing`); the kernels must handle
it as the XLA forms do: no ``inf − inf`` in their chunk-local decay sums, the state
before a boundary wiped exactly. GLA (per-channel gate plus the per-token reset) and
gated DeltaNet (the delta-rule kernel) run packed rows with ``backend=None`` under
``ops.compiling_for("gpu")`` — the kernels are chosen as on an accelerator — with the
kernel flavour pinned to the GPU or the TPU interpreter. Their outputs on the real
tokens and their gradients must equal (1e-5, float32) the XLA forms' on the same rows,
which ``tests/nn/test_packing.py`` compares with each document alone; no output, the
padding's included, may be NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_packing import ROWS, TOL, build, segment_ids
from tests.ops.helpers import assert_close
from xformjax import kernels, ops  # pyright: ignore[reportAttributeAccessIssue]

LENGTH = 32


@functools.cache
def packed_rows(variant: str):
    """``(loss, params, x, ids)``: the layer's random-weighted loss of packed rows
    ``loss(params, x) = (Σ y·weight, y)``, ``weight`` 0 on the padding."""
    layer = build(variant)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (len(ROWS), LENGTH, layer.config.d_model))
    ids = jnp.asarray(segment_ids(ROWS, LENGTH))
    weight = jax.random.normal(keys[1], x.shape) * (ids > 0)[..., None]

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x, segment_ids=ids)
        return jnp.sum(y * weight), y

    return loss, params, x, ids


def value_and_grads(variant: str):
    loss, params, x, _ = packed_rows(variant)
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)


@functools.cache
def xla_reference(variant: str):
    return value_and_grads(variant)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("variant", ["gla", "gated_deltanet"])
def test_packed_documents_through_the_kernels_equal_the_xla_forms(variant, target, monkeypatch):
    (_, y_xla), grads_xla = xla_reference(variant)
    ran = []

    def pinned(kernel):
        def run(*args, **kwargs):
            ran.append(kernel)
            return kernel(*args, **kwargs, target=target, interpret=True)

        return run

    for name in ("linear_attention", "delta_rule"):
        monkeypatch.setattr(kernels, name, pinned(getattr(kernels, name)))
    with ops.compiling_for("gpu"):
        (_, y), grads = value_and_grads(variant)
    assert ran, "the layer did not run a kernel"
    what = f"{variant} ({target} kernel)"
    assert bool(jnp.all(jnp.isfinite(y))), f"{what}: NaN or inf (padding included)"
    real = np.asarray(packed_rows(variant)[3]) > 0
    assert_close(np.asarray(y)[real], np.asarray(y_xla)[real], TOL, f"{what}: outputs")
    assert_close(grads[1], grads_xla[1], TOL, f"{what}: input gradient")
    flat = dict(jax.tree_util.tree_leaves_with_path(grads[0]))
    for path, g_xla in jax.tree_util.tree_leaves_with_path(grads_xla[0]):
        assert_close(flat[path], g_xla, TOL, f"{what}: gradient of {jax.tree_util.keystr(path)}")
