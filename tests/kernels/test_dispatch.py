"""Which backend the ops run, and the fallback for what the kernels do not cover."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import assert_close
from xformjax import ops
from xformjax.ops import common

B, T, H, K = 1, 40, 2, 16


@pytest.fixture(autouse=True)
def fresh_warnings():
    common._WARNED.clear()
    yield
    common._WARNED.clear()


def inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.1, 1.9, (B, T, H)), dtype)
    g = jnp.asarray(np.log(rng.uniform(0.5, 1.0, (B, T, H))), dtype)
    return q, k, v, beta, g


def has_pallas_call(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_default_backend_on_cpu_is_xla():
    q, k, v, beta, g = inputs()
    assert jax.default_backend() == "cpu"
    assert not has_pallas_call(lambda q: ops.linear_attention(q, k, v, g=g)[0], q)
    assert has_pallas_call(lambda q: ops.linear_attention(q, k, v, g=g, backend="pallas")[0], q)
    assert not has_pallas_call(lambda q: ops.delta_rule(q, k, v, beta, g=g)[0], q)
    assert has_pallas_call(lambda q: ops.delta_rule(q, k, v, beta, g=g, backend="pallas")[0], q)


def test_default_backend_on_an_accelerator_is_the_kernel(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert common.resolve_backend("op", None, has_kernel=True) == "pallas"
    assert common.resolve_backend("op", "xla", has_kernel=True) == "xla"
    assert common.resolve_backend("op", None, has_kernel=False) == "xla"
    with pytest.warns(RuntimeWarning, match="does not cover normalize"):
        assert common.resolve_backend("op", None, "normalize", has_kernel=True) == "xla"


@pytest.mark.parametrize("num_householder", [1, 2])
def test_pallas_ops_equal_xla(num_householder):
    q, k, v, beta, g = inputs()
    o, s = ops.linear_attention(q, k, v, g=g, backend="pallas", output_final_state=True)
    o_ref, s_ref = ops.linear_attention(q, k, v, g=g, backend="xla", output_final_state=True)
    assert_close(o, o_ref, 1e-5, "linear attention")
    assert_close(s, s_ref, 1e-5, "linear attention state")
    n = num_householder
    rows = lambda x: jnp.repeat(x, n, axis=1)
    args = (q, rows(k), rows(v), rows(beta))
    o, s = ops.delta_product(
        *args, num_householder=n, g=g, backend="pallas", output_final_state=True
    )
    o_ref, s_ref = ops.delta_product(
        *args, num_householder=n, g=g, backend="xla", output_final_state=True
    )
    assert_close(o, o_ref, 1e-5, "delta product")
    assert_close(s, s_ref, 1e-5, "delta product state")


@pytest.mark.parametrize(
    "what, call",
    [
        (
            "normalize=True",
            lambda q, k, v, beta, g: ops.linear_attention(
                q, k, v, normalize=True, backend="pallas"
            ),
        ),
        (
            "packed sequences",
            lambda q, k, v, beta, g: ops.linear_attention(
                q, k, v, cu_seqlens=jnp.array([0, 10, T]), backend="pallas"
            ),
        ),
        (
            "mode='recurrent'",
            lambda q, k, v, beta, g: ops.linear_attention(
                q, k, v, mode="recurrent", backend="pallas"
            ),
        ),
        (
            "the per-channel gate",
            lambda q, k, v, beta, g: ops.delta_rule(
                q, k, v, beta, gk=jnp.broadcast_to(g[..., None], q.shape), backend="pallas"
            ),
        ),
    ],
)
def test_uncovered_inputs_fall_back_to_xla_with_one_warning(what, call):
    args = inputs()
    with pytest.warns(RuntimeWarning, match=f"does not cover {what}.*running the XLA form"):
        out, _ = call(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = call(*args)  # warned once only
    np.testing.assert_array_equal(out, again)
    assert not has_pallas_call(lambda *a: call(*a)[0], *args)


def test_float64_falls_back(x64):
    q, k, v, beta, g = inputs(dtype=jnp.float64)
    with pytest.warns(RuntimeWarning, match="float64 inputs"):
        o, _ = ops.delta_rule(q, k, v, beta, g=g, backend="pallas")
    assert o.dtype == jnp.float64
    assert_close(o, ops.delta_rule(q, k, v, beta, g=g, backend="xla")[0], 1e-12, "float64")


def test_ops_without_a_kernel_warn_and_run_xla():
    q, k, v, _, _ = inputs()
    with pytest.warns(RuntimeWarning, match="softmax_attention: has no Pallas kernel"):
        o, _ = ops.softmax_attention(q, k, v, backend="pallas")
    assert_close(o, ops.softmax_attention(q, k, v)[0], 0, "softmax attention")


def test_mixed_dtypes_keep_the_widest_output_dtype():
    q, k, v, _beta, g = inputs()
    v16 = v.astype(jnp.bfloat16)
    o, _ = ops.linear_attention(q, k, v16, g=g, backend="pallas")
    o_ref, _ = ops.linear_attention(q, k, v16, g=g, backend="xla")
    assert o.dtype == o_ref.dtype == jnp.float32
    assert_close(o, o_ref, 1e-5, "f32 q, k with bf16 v")


def test_other_dtypes_fall_back():
    q, k, v, beta, g = (x.astype(jnp.float16) for x in inputs())
    with pytest.warns(RuntimeWarning, match="float16 inputs"):
        o, _ = ops.delta_rule(q, k, v, beta, g=g, backend="pallas")
    assert o.dtype == jnp.float16


def test_default_kernel_lowers_to_xla_on_cpu(monkeypatch):
    """``backend=None`` on a GPU/TPU host picks the kernel; if the same program is
    lowered for a CPU it runs the XLA form, never the (slow) interpreter."""
    q, k, v, beta, g = inputs()
    expected = ops.delta_rule(q, k, v, beta, g=g, backend="xla")[0]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fn = jax.jit(lambda q: ops.delta_rule(q, k, v, beta, g=g)[0])
    assert has_pallas_call(fn, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(q)  # runs here, on the CPU
        ops.linear_attention(q, k, v, mode="recurrent")  # another mode: XLA, no warning
    assert "pallas" not in fn.lower(q).as_text().lower()
    assert_close(out, expected, 1e-6, "CPU lowering of the default kernel choice")


def test_head_dims_beyond_the_compile_gate_run_xla_on_a_gpu(monkeypatch):
    """``backend=None`` on a GPU uses a kernel only where the sm_90 gate proved it fits:
    K or V above 256 runs XLA, with one warning that names the reason."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 8, 1, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 8, 1, 320)), jnp.float32)
    with pytest.warns(RuntimeWarning, match=r"head dims K=16, V=320 .*K, V ≤ 256"):
        o, _ = ops.linear_attention(q, q, v)
    assert not has_pallas_call(lambda q, v: ops.linear_attention(q, q, v)[0], q, v)
    assert_close(o, ops.linear_attention(q, q, v, backend="xla")[0], 1e-6, "wide heads")
