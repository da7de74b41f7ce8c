"""The TPU compile gate: every kernel the public ops run on a TPU compiles for real TPU slices.

For each op with ``backend="pallas"`` — scalar-gated linear attention, per-channel GLA,
the gated delta rule — forward and forward+backward, B=1, T=32768, H=16 (split over the
slice's four chips), at (K, V) ∈ {(128, 128), (128, 256), (256, 256)}, bfloat16 and
float32, the program is compiled by libtpu for ``v5e:2x2`` and ``v6e:2x2`` on this CPU
(``experiments/bench/tpu_gate.py``; 72 programs). Mosaic must accept every kernel and
fit its VMEM (a failure raises from ``compile()``), the compiled program must hold exactly
its kernels (``tpu_custom_call`` s, by name: a program that fell back to XLA has none),
and each chip's bytes must fit its HBM. Interpret mode proves the math
(``tests/kernels/test_interpret.py``); this proves TPUs accept the kernels.
``python -m experiments.bench.tpu_gate`` prints the same programs as a table.
"""

from __future__ import annotations

import pytest

from experiments.bench.tpu_gate import all_cases, compile_case, find_libtpu
from xformjax.parallel import tpu

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(
        find_libtpu() is None,
        reason="libtpu is not installed here (make .libtpu/.installed; its wheel is for "
        "Linux x86-64) and TPU_LIBRARY_PATH is unset",
    ),
]
COMPILE_LIMIT_S = 120.0
#: The Mosaic kernels of each compiled program. Forward: the state recurrence and the
#: outputs (the delta rule's W/U first). Forward+backward: what the gradient needs of the
#: forward (the states; the outputs' values are not needed, and the delta rule's
#: recomputation of W/U and the states is the forward's, shared), then the reverse state
#: recurrence and one chunk-parallel gradient kernel (the delta rule's dv_local first).
MOSAIC_KERNELS = {
    ("linear_attention", "forward"): ("linear_attention_output_fwd", "linear_attention_state_fwd"),
    ("linear_attention", "forward+backward"): (
        "linear_attention_chunk_bwd",
        "linear_attention_state_bwd",
        "linear_attention_state_fwd",
    ),
    ("gla", "forward"): ("gated_linear_attention_output_fwd", "gated_linear_attention_state_fwd"),
    ("gla", "forward+backward"): (
        "gated_linear_attention_chunk_bwd",
        "gated_linear_attention_state_bwd",
        "gated_linear_attention_state_fwd",
    ),
    ("delta_rule", "forward"): ("delta_rule_output_fwd", "delta_rule_state_fwd", "delta_rule_wy"),
    ("delta_rule", "forward+backward"): (
        "delta_rule_chunk_bwd",
        "delta_rule_dv_local",
        "delta_rule_state_bwd",
        "delta_rule_state_fwd",
        "delta_rule_wy",
    ),
}


@pytest.mark.parametrize(
    "op, key_dim, value_dim, dtype, direction, topology",
    all_cases(),
    ids=lambda value: str(value),
)
def test_kernel_compiles_for_the_slice_and_fits(op, key_dim, value_dim, dtype, direction, topology):
    result = compile_case(op, key_dim, value_dim, dtype, direction, topology)
    assert result.mosaic_kernels == MOSAIC_KERNELS[op, direction], result
    chip = tpu.Topology.parse(topology).chip
    assert result.chip_bytes <= chip.hbm_bytes, result
    assert result.compile_seconds < COMPILE_LIMIT_S, result


def test_the_gate_covers_every_op_size_dtype_and_slice():
    cases = all_cases()
    assert len(cases) == 3 * 3 * 2 * 2 * 2 == 72
    assert {c[5] for c in cases} == {"v5e:2x2", "v6e:2x2"}
