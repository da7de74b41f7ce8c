"""The sm_90 compile gate as a table: what every GPU kernel costs an H100, measured on a CPU.

    python -m experiments.bench.sm90_gate            # all ops, the four head sizes (~5 min)
    python -m experiments.bench.sm90_gate --quick    # K = V = 128 only

For each op the library runs on a GPU with ``backend="pallas"`` (scalar-gated
linear attention, per-channel GLA, the gated delta rule), forward and
forward+backward, B=1, T=4096, H=16, at (K, V) ∈ {(64, 64), (128, 128),
(128, 256), (256, 256)} in bfloat16 and in float32: the program
is lowered for CUDA on this host and each Triton kernel is compiled with the pip
``triton`` for sm_90
(``xformjax.kernels.gpu.sm90``), giving the shared memory it asks for (the
H100 grants 232448 bytes), registers, spill bytes and the cold compile time.
Writes ``experiments/results/sm90_gate.md``. ``tests/kernels/test_sm90_gate.py``
asserts the same programs fit.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp

from xformjax import ops

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
BATCH, LENGTH, HEADS = 1, 4096, 16
HEAD_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (128, 256), (256, 256))
OPS: tuple[str, ...] = ("linear_attention", "gla", "delta_rule")
#: (K, V, dtype) of every program the gate compiles: each size in bfloat16 and float32.
CASES: tuple[tuple[int, int, str], ...] = tuple(
    (k, v, dtype) for dtype in ("bfloat16", "float32") for k, v in HEAD_SIZES
)


def _spec(*shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def op_program(
    op: str, key_dim: int, value_dim: int, dtype=jnp.bfloat16, length: int = LENGTH
) -> tuple[Callable, tuple[jax.ShapeDtypeStruct, ...]]:
    """``(fn, specs)``: the public op with ``backend="pallas"`` as an accelerator runs it,
    returning ``(o, final_state)``, and its argument shapes ``[B, length, H, ...]``."""
    tokens = (BATCH, length, HEADS)
    q, v = _spec(*tokens, key_dim, dtype=dtype), _spec(*tokens, value_dim, dtype=dtype)
    gate = _spec(*tokens, dtype=jnp.float32)
    if op == "linear_attention":
        fn = lambda q, k, v, g: ops.linear_attention(
            q, k, v, g=g, backend="pallas", output_final_state=True
        )
        return fn, (q, q, v, gate)
    if op == "gla":
        fn = lambda q, k, v, gk: ops.linear_attention(
            q, k, v, gk=gk, backend="pallas", output_final_state=True
        )
        return fn, (q, q, v, _spec(*tokens, key_dim, dtype=jnp.float32))
    if op == "delta_rule":
        fn = lambda q, k, v, beta, g: ops.delta_rule(
            q, k, v, beta, g=g, backend="pallas", output_final_state=True
        )
        return fn, (q, q, v, _spec(*tokens, dtype=dtype), gate)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def forward_and_backward(fn: Callable, num_args: int) -> Callable:
    """The gradient of a loss on ``fn``'s output and final state w.r.t. every argument."""

    def loss(*arrays):
        o, final = fn(*arrays)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    return jax.grad(loss, argnums=tuple(range(num_args)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = V = 128 only")
    args = parser.parse_args(argv)
    from xformjax.kernels.gpu import sm90  # needs triton

    cases = [(128, 128, "bfloat16")] if args.quick else CASES
    sections = []
    worst_shared, worst_spill, slowest = 0, 0, 0.0
    for op in OPS:
        for key_dim, value_dim, dtype in cases:
            fn, specs = op_program(op, key_dim, value_dim, jnp.dtype(dtype))
            reports = sm90.report(forward_and_backward(fn, len(specs)), *specs)
            title = f"### {op}, K={key_dim}, V={value_dim}, {dtype} (forward + backward)"
            sections.append(f"{title}\n\n{sm90.table(reports)}\n")
            print(sections[-1], flush=True)
            worst_shared = max([worst_shared] + [r.shared_bytes for r in reports])
            worst_spill = max([worst_spill] + [r.spill_bytes for r in reports])
            slowest = max([slowest] + [r.compile_seconds for r in reports])
    import triton

    header = (
        "# sm_90 compile gate\n\n"
        f"Every Triton kernel of the GPU path, compiled for an H100 (sm_90) on a CPU host "
        f"({platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"pip triton {triton.__version__}): `python -m experiments.bench.sm90_gate`. "
        f"B={BATCH}, T={LENGTH}, H={HEADS}; bfloat16 and float32 at every size. "
        "The H100 grants "
        f"{sm90.SHARED_LIMIT} bytes of shared memory per block.\n\n"
        f"Largest shared memory: **{worst_shared} B**; largest spill: **{worst_spill} B**; "
        f"slowest compile: **{slowest:.1f} s**. A kernel that the backward runs again (the "
        "delta rule recomputes its WY transform and states) is listed again.\n\n"
    )
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sm90_gate.md").write_text(header + "\n".join(sections))
        print(f"wrote {RESULTS / 'sm90_gate.md'}")


if __name__ == "__main__":
    main()
