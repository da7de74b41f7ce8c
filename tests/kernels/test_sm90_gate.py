"""The GPU compile gate: every kernel the public ops run on an H100 compiles for sm_90 and fits.

For each op with ``backend="pallas"`` — scalar-gated linear attention,
per-channel GLA, the gated delta rule — forward and forward+backward, B=1,
T=4096, H=16, at (K, V) ∈ {(64, 64), (128, 128), (128, 256), (256, 256)},
bfloat16 and float32: the program is lowered for CUDA on this CPU and each
Triton kernel in it is compiled with the pip ``triton`` (the H100 machine's
3.6.0) for sm_90 (``kernels/gpu/sm90.py``). Every kernel must ask for at most
the H100's 232448 bytes of shared memory, spill no registers, and compile in
under 60 s here: what interpret mode cannot see, and what made the previous
kernels fail on a real H100 (278528 bytes at K = V = 128; minutes of compiling).
``python -m experiments.bench.sm90_gate`` prints the same programs as tables.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from experiments.bench.sm90_gate import CASES, OPS, forward_and_backward, op_program

pytest.importorskip(
    "triton", reason="the sm_90 gate needs the pip triton (dev extra, Linux x86-64)"
)

from xformjax.kernels.gpu import sm90  # needs triton: after the skip

pytestmark = pytest.mark.sm90
COMPILE_LIMIT_S = 60.0
#: The kernels of each op's forward + backward program: the chunk-parallel decomposition.
KERNELS = {
    "linear_attention": {
        "linear_attention_state_fwd",
        "linear_attention_output_fwd",
        "linear_attention_state_bwd",
        "linear_attention_output_bwd_dv",
        "linear_attention_output_bwd_dqk",
    },
    "gla": {
        "gla_fwd_h",
        "gla_fwd_intra",
        "gla_fwd_o",
        "gla_bwd_dh",
        "gla_bwd_da",
        "gla_bwd_dv",
        "gla_bwd_intra",
        "gla_bwd_dqk",
    },
    "delta_rule": {
        "delta_rule_wy_inverse",
        "delta_rule_wy_recompute",
        "delta_rule_state_fwd",
        "linear_attention_output_fwd",
        "delta_rule_output_bwd_dv",
        "delta_rule_state_bwd",
        "delta_rule_output_bwd_dqkw",
        "delta_rule_wy_bwd",
    },
}
PROGRAMS = [(op, *case) for op in OPS for case in CASES]


@pytest.mark.parametrize("op,key_dim,value_dim,dtype", PROGRAMS, ids=lambda x: str(x))
def test_every_kernel_fits_an_h100(op, key_dim, value_dim, dtype):
    fn, specs = op_program(op, key_dim, value_dim, jnp.dtype(dtype))
    forward = sm90.report(fn, *specs)
    both = sm90.report(forward_and_backward(fn, len(specs)), *specs)
    assert forward, "the forward lowered to no Triton kernel"
    assert len(both) > len(forward), "the backward lowered to no Triton kernel"
    assert {r.name for r in both} == KERNELS[op]
    print(f"\n{op} K={key_dim} V={value_dim} {dtype}\n{sm90.table(both)}")
    for r in both:
        assert r.shared_bytes <= sm90.SHARED_LIMIT, f"{r.name}: {r.shared_bytes} B shared"
        assert r.spill_bytes == 0, f"{r.name}: spills {r.spill_bytes} B"
        assert r.compile_seconds < COMPILE_LIMIT_S, f"{r.name}: {r.compile_seconds:.0f} s"
