"""Every kernel lowers for TPU (Mosaic) and CUDA (Triton) without the hardware.

Realistic shapes (H = 16, K = V = 128, T = 8192, bfloat16), forward and
backward, with the default block sizes: ``jax.jit(...).trace(...).lower(
lowering_platforms=(platform,))`` runs the Pallas → Mosaic / Triton lowering,
which rejects what the target cannot compile (block shapes, unsupported ops).
On both targets the forward is several chunk-parallel kernels (for the delta
rule W and U, then the states, then the outputs) and the backward its own set.
The public ops with
``backend="pallas"`` are checked the same way, and their
lowering for each platform must hold exactly that platform's kernel: interpret
mode is only the CPU lowering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from xformjax import kernels, ops

B, T, H, K, V = 1, 8192, 16, 128, 128
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


SEQ = spec(B, T, H, K)
GATE = spec(B, T, H, dtype=jnp.float32)
FUNCTIONS = {
    "linear_attention-token": (
        lambda q, k, v, g: kernels.linear_attention(q, k, v, g=g),
        (SEQ, SEQ, spec(B, T, H, V), GATE),
    ),
    "linear_attention-head": (
        lambda q, k, v, g: kernels.linear_attention(q, k, v, g=g),
        (SEQ, SEQ, spec(B, T, H, V), spec(H, dtype=jnp.float32)),
    ),
    "linear_attention-channel": (
        lambda q, k, v, gk: kernels.linear_attention(q, k, v, gk=gk),
        (SEQ, SEQ, spec(B, T, H, V), spec(B, T, H, K, dtype=jnp.float32)),
    ),
    "delta_rule-gated": (
        lambda q, k, v, beta, g: kernels.delta_rule(q, k, v, beta, g=g),
        (SEQ, SEQ, spec(B, T, H, V), spec(B, T, H), GATE),
    ),
}
#: (forward, forward + backward) Mosaic kernel calls of each function (see the test).
TPU_KERNELS = {
    "linear_attention-token": (2, 4),
    "linear_attention-head": (2, 4),
    "linear_attention-channel": (2, 4),
    "delta_rule-gated": (3, 5),
}


def custom_calls(fn, args, platform: str) -> list[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return [
        line.split("custom_call @")[1].split("(")[0]
        for line in text.splitlines()
        if "custom_call @" in line
    ]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_kernel_lowers_forward_and_backward(name, platform):
    fn, args = FUNCTIONS[name]
    forward = custom_calls(fn, args, platform)
    assert forward and set(forward) == {KERNEL_CALL[platform]}

    def loss(*arrays):
        o, final = fn(*arrays)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    # The forward saving what the backward needs, then the backward kernels: the
    # chunk-parallel decomposition on both targets.
    both = custom_calls(grad, args, platform)
    assert set(both) == {KERNEL_CALL[platform]} and len(both) > len(forward)
    if platform == "tpu":
        # linear attention and GLA: states, outputs; backward: reverse states, gradients.
        # delta rule: W/U, states, outputs; backward: dv_local, reverse states, gradients.
        assert (len(forward), len(both)) == TPU_KERNELS[name]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_public_ops_lower_to_the_platform_kernel(platform):
    def both(q, k, v, beta, g):
        o1, _ = ops.linear_attention(q, k, v, g=g, backend="pallas")
        o2, _ = ops.delta_rule(q, k, v, beta, g=g, backend="pallas")
        return o1, o2

    args = (SEQ, SEQ, spec(B, T, H, V), spec(B, T, H), GATE)
    calls = custom_calls(both, args, platform)
    assert len(calls) >= 2 and set(calls) == {KERNEL_CALL[platform]}
    # The same program lowered for the CPU runs the interpreter: no kernel call.
    assert custom_calls(both, args, "cpu") == []
