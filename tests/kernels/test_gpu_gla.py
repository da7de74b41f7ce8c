"""The chunk-parallel GPU GLA kernels (``kernels/gpu/gla.py``) equal the XLA chunk form.

Pallas interpret mode on the CPU, forward and every gradient (q, k, v, gk, g,
initial_state) of a random-weighted loss of ``(o, final_state)``, against
``ops.linear_attention(..., backend="xla")`` — itself checked against float64
numpy recurrences in ``tests/ops``: float32 within 1e-5 relative, bfloat16 within
2e-2. Shapes are awkward on purpose (T not a multiple of the 64-token chunk or
shorter than one, K ≠ V and not powers of two, B·H > 1).

Strong gates (every gate log(1e-3); −20 per token and channel over 1024 tokens)
run with ``jax_enable_x64`` on (float32 inputs: the kernels' loop indices must stay
int32) and are compared with the XLA form in float64: there the true gate
gradient is tiny next to the O(1) terms whose difference it is, and the XLA form
in float32 loses it (relative errors 3e-4 and 3e+2) while the kernels, which
never subtract those terms, keep it within 1e-5 (−20) and within the float32
floor of rounding ``b`` (log(1e-3): 8e-6, tolerance 3e-5).

That every kernel fits an H100 is ``test_sm90_gate.py``'s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.gpu_cases import (
    Shape,
    add_gate_and_state,
    assert_matches,
    features,
    value_and_grads,
    xla_reference,
)
from tests.ops.helpers import assert_close, log_gates
from xformjax.kernels.gpu.gla import (  # pyright: ignore[reportMissingImports]
    gated_linear_attention,
)
from xformjax.kernels.gpu.gla_common import (  # pyright: ignore[reportMissingImports]
    TILES,
    GLATiles,
)

#: 16-wide feature tiles: several key and value tiles per head at small K and V.
SMALL_TILES = GLATiles(block_k=16, block_v=16, state_block_k=16, state_block_v=16, inter_block_v=16)
#: The scalar gate ``g`` folded into ``gk`` by each gate kind (``gpu_cases.scalar_gate``).
SCALAR_GATE = {"channel": "none", "channel+token": "token", "channel+head": "head"}


@dataclasses.dataclass(frozen=True)
class Case(Shape):
    gate: str  # "channel" | "channel+token" | "channel+head"
    small_tiles: bool = False  # SMALL_TILES instead of the default tiling

    @property
    def name(self) -> str:
        return (
            f"{self.gate}-{self.dims}-{self.dtype}"
            + ("-h0" if self.initial_state else "")
            + ("-16tiles" if self.small_tiles else "")
        )


CASES = [
    Case("channel"),  # T = 100: one full chunk and a padded one
    # 3 chunks, B·H = 4, 16-wide tiles: 4 key tiles (K = 33 → 64), 2 value tiles (V = 20 → 32)
    Case("channel+token", batch=2, length=131, key_dim=33, value_dim=20, small_tiles=True),
    Case("channel+head", batch=2, length=5, heads=3, key_dim=16, value_dim=33, initial_state=False),
    Case("channel+token", length=131, dtype="bfloat16"),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    inputs = {
        "q": jnp.asarray(features(rng, case, case.key_dim), dtype),
        "k": jnp.asarray(features(rng, case, case.key_dim), dtype),
        "v": jnp.asarray(features(rng, case, case.value_dim), dtype),
    }
    inputs["gk"] = jnp.asarray(log_gates(rng, case.tokens + (case.key_dim,), "strong"), jnp.float32)
    return add_gate_and_state(inputs, rng, case, SCALAR_GATE[case.gate])


def kernel_fn(q, k, v, gk, g=None, initial_state=None, tiles: GLATiles = TILES):
    return gated_linear_attention(
        q, k, v, gk, g, initial_state, scale=q.shape[-1] ** -0.5, interpret=True, tiles=tiles
    )


xla_fn = xla_reference("linear_attention")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gla_kernels_match_xla_chunk_form(case):
    inputs = make_inputs(case)
    tiles = SMALL_TILES if case.small_tiles else TILES
    result = value_and_grads(functools.partial(kernel_fn, tiles=tiles), case, inputs)
    reference = value_and_grads(xla_fn, case, inputs)
    (o, _), grads = result
    assert o.dtype == jnp.dtype(case.dtype)
    assert all(grads[name].shape == inputs[name].shape for name in inputs)
    assert_matches(case, result, reference)


#: strength → (case, gk, g, tolerance of the gate gradients). Under log(1e-3) the gate
#: gradient is carried by the e^{b_i − b_{i−1}} ≈ 1e-3 neighbour terms, and b (down to
#: 64·log(1e-3) ≈ −442 in a chunk) rounded to float32 already moves each of them by up to
#: 442·2⁻²⁴ ≈ 2.6e-5 relative: that floor (the kernels reach ~8e-6) is the tolerance.
STRONG = {
    # every gate log(1e-3): the decay over one 16-row sub-chunk is 1e-48
    "log(1e-3)": (
        Case("channel", length=70, key_dim=12, value_dim=20),
        np.log(1e-3),
        None,
        3e-5,
    ),
    # −20 per token and channel, −1 more per token from g, over 16 chunks
    "-20": (
        Case("channel+token", length=1024, heads=1, key_dim=16, value_dim=16),
        -20.0,
        -1.0,
        1e-5,
    ),
}


@pytest.mark.float64
@pytest.mark.parametrize("strength", STRONG)
def test_strong_gates_stay_finite_and_accurate(strength, x64):
    """float32 kernels under x64 vs the XLA chunk form in float64: outputs and every
    gradient finite and within 1e-5 (the gate gradients within their float32 floor)."""
    case, gk, g, gate_tol = STRONG[strength]
    inputs = make_inputs(case, seed=3)
    inputs["gk"] = jnp.full(inputs["gk"].shape, gk, jnp.float32)
    if g is not None:
        inputs["g"] = jnp.full(inputs["g"].shape, g, jnp.float32)
    wide = {name: x.astype(jnp.float64) for name, x in inputs.items()}
    (o, final), grads = value_and_grads(kernel_fn, case, inputs)
    (o_ref, final_ref), grads_ref = value_and_grads(xla_fn, case, wide)
    assert o.dtype == jnp.float32 and final.dtype == jnp.float32
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(final, final_ref, 1e-5, "final state")
    for name, grad in grads.items():
        assert grad.dtype == jnp.float32 and np.all(np.isfinite(grad)), f"d{name}"
        tol = gate_tol if name in ("gk", "g") else 1e-5
        assert_close(grad, grads_ref[name], tol, f"d{name}")
