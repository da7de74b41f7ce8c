"""Does a GPU kernel fit an H100? Compile it for ``sm_90`` on a CPU host and read the cost.

JAX lowers a Pallas kernel for CUDA to a ``__gpu$xla.gpu.triton`` custom call
whose backend config holds the Triton module (MLIR bytecode, field ``ir``) and
its launch parameters. On a GPU, XLA compiles that module with jaxlib's
bundled Triton. Here we do the same with the pip ``triton`` package (the
H100 machine's version, 3.6.0) for ``GPUTarget("cuda", 90, 32)``:

* ``kernel.metadata.shared`` is the shared memory the launch asks for — the
  number the H100 refuses above 232448 bytes (``SHARED_LIMIT``); today's
  sequential forward kernel gives exactly the 98312 bytes XLA reported;
* ``ptxas -v`` (triton's bundled one, run by triton itself) gives registers
  and spill bytes;
* the wall time of the compile, which users pay at their first call.

``report(fn, *specs)`` does it for every kernel in ``jax.jit(fn)``'s CUDA
lowering. It needs ``triton`` (a dev dependency, Linux x86-64); the rest of
the library never imports this module.

    from xformjax.kernels.gpu import sm90
    for r in sm90.report(loss_and_grad, *shape_dtype_structs):
        print(r.name, r.shared_bytes, r.registers, r.spill_bytes, r.compile_seconds)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator

import jax

#: Shared memory per block an H100 grants (``cudaDevAttrMaxSharedMemoryPerBlockOptin``).
SHARED_LIMIT = 232_448
#: Compute capability and warp size of the target.
CAPABILITY, WARP_SIZE = 90, 32
TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas kernel as the CUDA lowering hands it to XLA."""

    name: str
    module: bytes  # MLIR bytecode of the Triton (``tt``) module
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What compiling one kernel for sm_90 costs."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas counts them
    compile_seconds: float

    @property
    def fits(self) -> bool:
        """Within the H100's shared memory and free of register spills."""
        return self.shared_bytes <= SHARED_LIMIT and self.spill_bytes == 0


def _custom_calls(operation) -> Iterator:
    for region in operation.regions:
        for block in region.blocks:
            for op in block.operations:
                if op.operation.name == "stablehlo.custom_call":
                    yield op
                yield from _custom_calls(op.operation)


def triton_kernels(fn: Callable, *specs) -> list[TritonKernel]:
    """The Triton kernels of ``jax.jit(fn)`` lowered for CUDA at ``specs`` (shape/dtype
    structs or arrays), in program order."""
    from jaxlib.mlir import ir

    lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    assert module is not None, "the CUDA lowering gave no StableHLO module"
    kernels = []
    for op in _custom_calls(module.operation):
        attributes = op.operation.attributes
        if ir.StringAttr(attributes["call_target_name"]).value != TRITON_CALL:
            continue
        config = ir.DictAttr(attributes["mhlo.backend_config"])

        def integer(key: str, config=config) -> int:
            return ir.IntegerAttr(config[key]).value

        kernels.append(
            TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                module=ir.StringAttr(config["ir"]).value_bytes,
                num_warps=integer("num_warps"),
                num_stages=integer("num_stages"),
                grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
            )
        )
    return kernels


def triton_source(kernel: TritonKernel) -> str:
    """The kernel's Triton module as MLIR text (``.ttir``), read with jaxlib's MLIR
    context and its registered Triton dialect."""
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect

    context = ir.Context()
    dialect.register_dialect(context)
    with context:
        module = ir.Module.parse(kernel.module)
        return str(module.operation.get_asm(enable_debug_info=False))


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CACHE: dict[str, KernelReport] = {}


def compile_sm90(kernel: TritonKernel) -> KernelReport:
    """Compile ``kernel`` with the pip ``triton`` for sm_90 (no triton cache: the time is a
    cold compile's); identical kernels are compiled once per process."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    source = triton_source(kernel)
    key = hashlib.sha256(f"{source}{kernel.num_warps}/{kernel.num_stages}".encode()).hexdigest()
    if key in _CACHE:
        return dataclasses.replace(_CACHE[key], name=kernel.name, grid=kernel.grid)
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, f"{kernel.name}.ttir")
        with open(path, "w") as file:
            file.write(source)
        log = io.StringIO()
        previous = (os.environ.get("TRITON_CACHE_DIR"), knobs.nvidia.dump_ptxas_log)
        os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "cache")
        knobs.nvidia.dump_ptxas_log = True
        try:
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    path,
                    target=GPUTarget("cuda", CAPABILITY, WARP_SIZE),
                    options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
                )
            seconds = time.perf_counter() - start
        finally:
            if previous[0] is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous[0]
            knobs.nvidia.dump_ptxas_log = previous[1]
    text = log.getvalue()
    registers = _REGISTERS.search(text)
    spills = _SPILLS.search(text)
    if registers is None or spills is None:
        raise RuntimeError(f"{kernel.name}: no ptxas report in the compile log:\n{text}")
    report = KernelReport(
        name=kernel.name,
        grid=kernel.grid,
        num_warps=kernel.num_warps,
        num_stages=kernel.num_stages,
        shared_bytes=int(compiled.metadata.shared),
        registers=int(registers.group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        compile_seconds=seconds,
    )
    _CACHE[key] = report
    return report


def report(fn: Callable, *specs) -> list[KernelReport]:
    """Compile every Triton kernel of ``jax.jit(fn)`` at ``specs`` for sm_90."""
    return [compile_sm90(kernel) for kernel in triton_kernels(fn, *specs)]


def table(reports: list[KernelReport]) -> str:
    """A markdown table of ``reports``."""
    lines = [
        "| kernel | grid | warps | stages | shared (B) | registers | spills (B) | compile (s) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {'×'.join(map(str, r.grid))} | {r.num_warps} | {r.num_stages} "
            f"| {r.shared_bytes} | {r.registers} | {r.spill_bytes} | {r.compile_seconds:.1f} |"
        )
    return "\n".join(lines)
