"""The TPU compile gate as a table: every Pallas kernel compiled for TPU slices on a CPU host.

    python -m experiments.bench.tpu_gate             # 72 programs (~3 min on 2 cores)
    python -m experiments.bench.tpu_gate --quick     # K = V = 128, bfloat16 only

For each op the library runs on a TPU with ``backend="pallas"`` (scalar-gated linear
attention, per-channel GLA, the gated delta rule), forward and forward+backward, B=1,
T=32768, H=16, at (K, V) ∈ {(128, 128), (128, 256), (256, 256)} in bfloat16 and in
float32, the program is compiled by libtpu for ``v5e:2x2`` and ``v6e:2x2`` (four chips,
the heads split over them by ``shard_map``: four per chip): XLA:TPU and Mosaic, on this
host (:mod:`xformjax.parallel.tpu`). Each row gives the Mosaic kernels in the compiled
program (``tpu_custom_call`` s), the bytes per chip (arguments, outputs, temporaries)
and the compile time. A kernel that Mosaic rejects, or whose VMEM does not fit, fails
the compile. Writes ``experiments/results/tpu_gate.md``;
``tests/kernels/test_tpu_gate.py`` compiles the same programs and asserts they fit.
libtpu comes from ``$TPU_LIBRARY_PATH``, the installed ``libtpu`` or the checkout's
``.libtpu`` (``make .libtpu/.installed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.bench.sm90_gate import OPS, forward_and_backward, op_program
from xformjax.parallel import tpu

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
#: The checkout's libtpu (``make .libtpu/.installed``), used when none is installed.
CHECKOUT_LIBTPU = ROOT / ".libtpu"
LENGTH = 32768
TOPOLOGIES: tuple[str, ...] = ("v5e:2x2", "v6e:2x2")
HEAD_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (128, 256), (256, 256))
DTYPES: tuple[str, ...] = ("bfloat16", "float32")
DIRECTIONS: tuple[str, ...] = ("forward", "forward+backward")
MOSAIC_CALL = "tpu_custom_call"
#: A Mosaic call's kernel name: the name scope just above ``pallas_call`` in its metadata.
_KERNEL_NAME = re.compile(
    rf'custom_call_target="{MOSAIC_CALL}".*?op_name="(?:[^"]*/)?([^"/]+)/pallas_call"'
)


def mosaic_kernels(hlo_text: str) -> tuple[str, ...]:
    """The names of the Mosaic kernels in a compiled program's HLO text, sorted (a kernel
    the program calls twice is listed twice)."""
    return tuple(sorted(_KERNEL_NAME.findall(hlo_text)))


def find_libtpu() -> pathlib.Path | None:
    """libtpu as :func:`xformjax.parallel.tpu.libtpu_path` finds it, else the checkout's."""
    return tpu.libtpu_path() or tpu.libtpu_path(CHECKOUT_LIBTPU)


@dataclasses.dataclass(frozen=True)
class GateResult:
    """One compiled program: which, and what it costs a chip."""

    op: str
    key_dim: int
    value_dim: int
    dtype: str
    direction: str
    topology: str
    mosaic_kernels: tuple[str, ...]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    compile_seconds: float

    @property
    def chip_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes


@functools.cache
def _mesh(topology: str) -> Mesh:
    libtpu = find_libtpu()
    return Mesh(np.array(tpu.topology_devices(topology, libtpu)), ("heads",))


def _head_spec(spec: jax.ShapeDtypeStruct) -> PartitionSpec:
    """``[B, T, H, ...]`` arguments split along H (axis 2)."""
    return PartitionSpec(None, None, "heads")


def sharded_program(
    op: str, key_dim: int, value_dim: int, dtype: str, direction: str, mesh: Mesh
) -> tuple[Callable, tuple[jax.ShapeDtypeStruct, ...]]:
    """The jitted op (or its gradient) with the heads split over ``mesh`` and its
    argument specs, each carrying its sharding."""
    fn, specs = op_program(op, key_dim, value_dim, jnp.dtype(dtype), LENGTH)
    in_specs = tuple(_head_spec(s) for s in specs)
    if direction == "forward":
        body = fn
        out_specs = (PartitionSpec(None, None, "heads"), PartitionSpec(None, "heads"))
    else:
        body = forward_and_backward(fn, len(specs))
        out_specs = in_specs
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    placed = tuple(
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p))
        for s, p in zip(specs, in_specs)
    )
    return jax.jit(mapped), placed


def compile_case(
    op: str, key_dim: int, value_dim: int, dtype: str, direction: str, topology: str
) -> GateResult:
    """Compile one program for ``topology`` with libtpu; raises what the compiler raises."""
    mesh = _mesh(topology)
    program, specs = sharded_program(op, key_dim, value_dim, dtype, direction, mesh)
    start = time.perf_counter()
    compiled = program.trace(*specs).lower().compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return GateResult(
        op,
        key_dim,
        value_dim,
        dtype,
        direction,
        topology,
        mosaic_kernels(compiled.as_text()),
        int(memory.argument_size_in_bytes),
        int(memory.output_size_in_bytes),
        int(memory.temp_size_in_bytes),
        seconds,
    )


def all_cases(quick: bool = False) -> list[tuple[str, int, int, str, str, str]]:
    sizes = HEAD_SIZES[:1] if quick else HEAD_SIZES
    dtypes = DTYPES[:1] if quick else DTYPES
    return [
        (op, k, v, dtype, direction, topology)
        for topology in TOPOLOGIES
        for op in OPS
        for k, v in sizes
        for dtype in dtypes
        for direction in DIRECTIONS
    ]


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f}"


def table(results: list[GateResult]) -> str:
    lines = [
        "| topology | op | K | V | dtype | program | Mosaic kernels | args MiB | out MiB "
        "| temp MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.topology} | {r.op} | {r.key_dim} | {r.value_dim} | {r.dtype} | "
            f"{r.direction} | {len(r.mosaic_kernels)} | {_mib(r.argument_bytes)} | "
            f"{_mib(r.output_bytes)} | {_mib(r.temp_bytes)} | {r.compile_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = V = 128, bfloat16 only")
    args = parser.parse_args(argv)
    libtpu = find_libtpu()
    if libtpu is None:
        raise SystemExit("libtpu not found: make .libtpu/.installed or set TPU_LIBRARY_PATH")
    results = []
    for case in all_cases(args.quick):
        results.append(compile_case(*case))
        r = results[-1]
        print(
            f"{r.topology} {r.op} K={r.key_dim} V={r.value_dim} {r.dtype} {r.direction}: "
            f"{', '.join(r.mosaic_kernels)}; {_mib(r.chip_bytes)} MiB/chip, "
            f"{r.compile_seconds:.1f} s",
            flush=True,
        )
    version = f"libtpu {tpu.libtpu_version(libtpu)}"
    worst = max(results, key=lambda r: r.chip_bytes)
    header = (
        "# TPU compile gate\n\n"
        f"Every Pallas kernel program the ops run on a TPU, compiled for TPU slices by "
        f"{version} on a 2-core CPU host (jax {jax.__version__}): "
        "`python -m experiments.bench.tpu_gate`. B=1, "
        f"T={LENGTH}, H=16 split over the slice's 4 chips (4 heads each); bfloat16 and "
        "float32. Bytes are per chip (`memory_analysis()`); a chip of v5e has 16 GiB of HBM, "
        "of v6e 32 GiB. Compile times are this host's, cold. No TPU speed is claimed: "
        "none can be measured here.\n\n"
        f"{len(results)} programs compiled; most bytes per chip: **{_mib(worst.chip_bytes)} "
        f"MiB** ({worst.op}, K={worst.key_dim}, V={worst.value_dim}, {worst.dtype}, "
        f"{worst.direction}, {worst.topology}); slowest compile: "
        f"**{max(r.compile_seconds for r in results):.1f} s**.\n\n"
    )
    text = header + table(results)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tpu_gate.md").write_text(text)
        print(f"wrote {RESULTS / 'tpu_gate.md'}")


if __name__ == "__main__":
    main()
