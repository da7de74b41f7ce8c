"""The train step compiled ahead of time for a TPU slice, on any host: ``xformjax aot``.

``compile_train_step(config, "v5e:4x4")`` builds what ``xformjax train`` would run —
the same jitted :func:`~xformjax.train.trainer.train_step_fn` with the same state and
batch shardings and the state donated (:func:`~xformjax.train.trainer.jit_train_step`)
— from shapes alone: the model and optimiser state come from ``nnx.eval_shape`` and
are placed by :func:`~xformjax.parallel.state_shardings` on a mesh of the slice's
compile-only devices (:func:`~xformjax.parallel.tpu.topology_devices`), and the
batches are ``[grad_accum, B, T]`` specs split as the trainer splits them. It is
traced under ``ops.compiling_for("tpu")`` so the layers pick the Pallas kernels a
TPU runs, and compiled by libtpu: XLA:TPU and Mosaic, nothing executed. The
:class:`AotReport` holds what the compiler says about one chip:

- bytes of the arguments (parameters, optimiser state, batch), outputs, temporaries
  and the generated code, against the chip's HBM (:data:`~xformjax.parallel.tpu.CHIPS`);
- the step's FLOPs (XLA's cost analysis of the program one chip runs);
- the collectives of the compiled program with their bytes
  (:mod:`xformjax.parallel.hlo`); LASP-2's carry the scope ``lasp2``, LASP-2H's
  ``lasp2h``;
- the compile time.

No number here is a speed: nothing runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
from flax import nnx

from xformjax import ops
from xformjax.parallel import hlo, lasp, lasp2h, make_mesh, resolve_mesh_shape, state_shardings, tpu
from xformjax.train.config import ExperimentConfig
from xformjax.train.trainer import (
    batch_dtypes,
    batch_sharding,
    build_state,
    check_divisibility,
    data_shape,
    jit_train_step,
)


class AotError(ValueError):
    """A configuration that cannot be compiled for the slice (the message says why)."""


class DoesNotFitError(AotError):
    """The compiled step needs more memory per chip than the chip has; ``report`` is
    the compiled step's (``None`` when the compiler itself refused for lack of HBM)."""

    def __init__(self, message: str, report: AotReport | None = None):
        self.report = report
        super().__init__(
            f"{message} (lower train.batch_size or train.seq_len, raise mesh.fsdp or "
            "mesh.seq, or use train.grad_accum)"
        )

    @classmethod
    def of(cls, report: AotReport) -> DoesNotFitError:
        return cls(
            f"the step needs {report.peak_bytes / tpu.GIB:.2f} GiB per chip; a "
            f"{report.chip} chip has {report.hbm_bytes / tpu.GIB:.0f} GiB of HBM",
            report,
        )


@dataclasses.dataclass(frozen=True)
class AotReport:
    """What compiling the train step for ``topology`` gave, per chip.

    Attributes:
      topology: the slice (``"v5e:4x4"``); ``chip`` its generation.
      mesh: the mesh axes' sizes, ``((axis, size), ...)`` over ``MESH_AXES``.
      batch: the batches' global shape ``(grad_accum, B, T)``.
      argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: per chip,
        from ``compiled.memory_analysis()`` (outputs aliased to the donated state are
        counted once in :attr:`peak_bytes`).
      hbm_bytes: the chip's HBM.
      flops: the step's floating-point operations on one chip (cost analysis).
      collectives: every collective of the compiled program (:mod:`~xformjax.parallel.hlo`).
      mosaic_kernels: the Pallas TPU (Mosaic) custom calls in the program.
      compile_seconds: tracing, lowering and compiling.
    """

    topology: str
    chip: str
    mesh: tuple[tuple[str, int], ...]
    batch: tuple[int, int, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float
    collectives: tuple[hlo.Collective, ...]
    mosaic_kernels: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries + generated code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    def scoped(self, scope: str, *, backward: bool | None = None) -> list[hlo.Collective]:
        """The collectives under ``jax.named_scope(scope)`` (``"lasp2"``, ``"lasp2h"``),
        only the forward's or the backward's if ``backward`` is given."""
        return [
            c
            for c in self.collectives
            if c.in_scope(scope) and (backward is None or c.backward == backward)
        ]

    def format(self) -> str:
        """The short text report ``xformjax aot`` prints."""
        gib = lambda n: f"{n / tpu.GIB:6.2f} GiB"
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh)
        accum, batch, length = self.batch
        lines = [
            f"topology {self.topology}: {math.prod(s for _, s in self.mesh)} {self.chip} "
            f"chips, mesh {mesh}",
            f"batch: {accum} × {batch} × {length} tokens per step",
            f"compiled in {self.compile_seconds:.1f} s; {self.mosaic_kernels} Mosaic kernel calls",
            "per-chip HBM:",
            f"  arguments     {gib(self.argument_bytes)}",
            f"  outputs       {gib(self.output_bytes)} ({gib(self.alias_bytes).strip()} "
            "aliased to the donated state)",
            f"  temporaries   {gib(self.temp_bytes)}",
            f"  program       {gib(self.code_bytes)}",
            f"  total         {gib(self.peak_bytes)} of {gib(self.hbm_bytes).strip()}: "
            + ("fits" if self.fits else "DOES NOT FIT"),
            f"step FLOPs per chip: {self.flops:.3e}",
            "collectives (count × bytes each):",
        ]
        for (kind, scope, size), count in sorted(_grouped(self.collectives).items()):
            lines.append(f"  {kind:<19} {scope:<16} {count:4d} × {_bytes(size)}")
        return "\n".join(lines)


def _bytes(size: int) -> str:
    for unit, scale in (("GiB", tpu.GIB), ("MiB", tpu.MIB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _grouped(collectives) -> dict[tuple[str, str, int], int]:
    """``{(kind, where, bytes): count}``; where is ``lasp2`` / ``lasp2h`` (with
    ``backward``) or ``other``."""
    counts: dict[tuple[str, str, int], int] = {}
    for item in collectives:
        scope = next((s for s in (lasp.SCOPE, lasp2h.SCOPE) if item.in_scope(s)), "other")
        where = f"{scope} {'backward' if item.backward else 'forward'}"
        key = (item.kind, where, item.bytes)
        counts[key] = counts.get(key, 0) + 1
    return counts


def check_model_divides(config: ExperimentConfig, mesh_shape: dict[str, int]) -> None:
    """Raise :class:`AotError` unless ``tensor`` divides the heads (query and key/value)
    and the MLP width, and ``fsdp`` divides ``d_model``: otherwise the layout rules
    would silently replicate those weights (:func:`~xformjax.parallel.logical_to_spec`)."""
    model, tensor, fsdp = config.model, mesh_shape["tensor"], mesh_shape["fsdp"]
    mixer = model.mixer
    sizes = {
        "model.mixer.num_heads": (mixer.num_heads, tensor, "mesh.tensor"),
        "model.mixer.num_kv_heads": (mixer.num_kv_heads or mixer.num_heads, tensor, "mesh.tensor"),
        "the MLP width": (model.hidden, tensor, "mesh.tensor"),
        "model.mixer.d_model": (mixer.d_model, fsdp, "mesh.fsdp"),
    }
    for name, (size, shards, axis) in sizes.items():
        if size % shards:
            raise AotError(f"{name}={size} does not divide over {axis}={shards}")


def abstract_train_state(config: ExperimentConfig, mesh) -> tuple[Any, Any, Any, Any]:
    """``(graphdef, state specs, state shardings, batch specs)`` of the train step on
    ``mesh`` — shapes only: no parameter is created, no data is read."""
    vocab_size, length = data_shape(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_state(config, vocab_size)))
    shardings = state_shardings(abstract, mesh)
    specs = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract, shardings
    )
    placed = batch_sharding(mesh)
    shape = (config.train.grad_accum, config.train.batch_size, length)
    batch = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
        for key, dtype in batch_dtypes(config.data.name == "text").items()
    }
    return graphdef, specs, shardings, batch


def compile_train_step(
    config: ExperimentConfig, topology: str, libtpu: str | os.PathLike | None = None
) -> AotReport:
    """Compile the train step of ``config`` for the TPU slice ``topology`` (see the
    module docstring). Raises :class:`~xformjax.parallel.tpu.TopologyError` (unknown
    slice, no libtpu) and :class:`AotError` (a mesh that does not use exactly the
    slice's chips, or does not divide the batch, sequence or model). Whether the step
    fits is :attr:`AotReport.fits` (:func:`report_or_raise` raises); a step the
    compiler itself rejects for lack of HBM raises :class:`DoesNotFitError`."""
    parsed = tpu.Topology.parse(topology)
    devices = tpu.topology_devices(parsed.name, libtpu)
    try:
        shape = resolve_mesh_shape(config.mesh.shape, len(devices))
    except ValueError as error:
        raise AotError(str(error)) from None
    if math.prod(shape.values()) != len(devices):
        raise AotError(
            f"mesh {shape} uses {math.prod(shape.values())} of the {len(devices)} devices of "
            f"{parsed.name}; a plan for the slice must use them all (set one axis to -1)"
        )
    _, length = data_shape(config)
    try:
        check_divisibility(shape, config.train.batch_size, length)
    except ValueError as error:
        raise AotError(str(error)) from None
    check_model_divides(config, shape)
    mesh = make_mesh(shape, devices)
    start = time.perf_counter()
    graphdef, specs, shardings, batch = abstract_train_state(config, mesh)
    step = jit_train_step(graphdef, shardings, mesh, config.train.aux_loss_weight)
    with ops.compiling_for("tpu"), jax.set_mesh(mesh):
        lowered = step.trace(specs, batch).lower()
    try:
        compiled = lowered.compile()
    except Exception as error:  # XLA:TPU refuses a program that overflows HBM
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        detail = str(error).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        raise DoesNotFitError(f"{parsed.name}: {detail}") from None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    return AotReport(
        topology=parsed.name,
        chip=parsed.chip.name,
        mesh=tuple(shape.items()),
        batch=(config.train.grad_accum, config.train.batch_size, length),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_bytes=parsed.chip.hbm_bytes,
        flops=float((cost or {}).get("flops", 0.0)),
        collectives=tuple(hlo.collectives(text)),
        mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'),
        compile_seconds=seconds,
    )


def report_or_raise(report: AotReport) -> AotReport:
    """``report``, or :class:`DoesNotFitError` if the step does not fit a chip."""
    if not report.fits:
        raise DoesNotFitError.of(report)
    return report


__all__ = [
    "AotError",
    "AotReport",
    "DoesNotFitError",
    "abstract_train_state",
    "check_model_divides",
    "compile_train_step",
    "report_or_raise",
]
