"""Kernel benchmark and device check (GPU): the Pallas kernels against XLA, cuDNN flash
attention and flash-linear-attention (fla).

    python -m experiments.bench.kernels --device-check          # on a GPU: < 8 min on an H100
    python -m experiments.bench.kernels                         # the same, no total time budget
    python -m experiments.bench.kernels --device-check --smoke  # anywhere (CPU: ~1 min)

Three ops, each through the public API:

* ``simple_gla``: ``ops.linear_attention(q, k, v, g=g [B, T, H])`` (scalar gate),
* ``gla``: ``ops.linear_attention(q, k, v, gk=gk [B, T, H, K])`` (per-channel gate),
* ``gated_delta_rule``: ``ops.delta_rule(q, k, v, beta, g=g)`` (q, k L2-normalised,
  β in (0, 1)),

and four implementations: ``pallas`` (``backend="pallas"``, the Triton-lowered
kernels), ``xla`` (``backend="xla"``, the chunk form), ``fla``
(``chunk_simple_gla``, ``chunk_gla``, ``chunk_gated_delta_rule`` of fla-core, when
``torch`` and ``fla`` import; the row says "not installed" otherwise) and, once per
shape, ``flash_attention`` (``jax.nn.dot_product_attention(..., is_causal=True,
implementation="cudnn")`` on the same bf16 q, k, v). In one process, in order:

1. ceilings: bf16 matmul TFLOP/s (8192³) and copy TB/s (1 GiB, bytes read + written);
2. correctness, float32: max |a − b| / max |b| between ``backend="pallas"`` and
   ``backend="xla"`` of the output, the final state and every gradient (q, k, v, the
   gate, β, the initial state) at K = V = 128 (B=1, T=512, H=4) and at an odd small
   shape (B=2, T=100, H=3, K=20, V=12); pass at ≤ 5e-3 (TF32 on the GPU gives ~1e-3).
   A failure is recorded and the timings go on;
3. timings: forward and forward+backward (``jax.vjp`` / ``torch.autograd.grad`` with a
   random cotangent: every input's gradient) at B ∈ {1, 8}, T ∈ {2K, 8K, 32K}, H=16,
   K=V=128, bf16 (gates in float32, ``log_sigmoid(N(0, 1) + 3)``; β = σ(N(0, 1))): the
   median over ≥ 20 samples after warm-up, each sample several back-to-back calls
   when one call is short (``jax.block_until_ready``; CUDA events for torch). The
   target shape (B=1, T=8K) runs first; each cell has a time budget and the whole run
   one (``--budget``, 400 s with ``--device-check``): cells past it are skipped with a
   note. An exception (OOM, compile error, fla refusing) is recorded in its row.

Results go to ``--out`` (default ``experiments/results/``; a temporary folder with
``--smoke``): ``kernels.md`` (device, versions, date, the ceiling, correctness and
timing tables, the targets with speedups vs flash and vs fla), ``kernels.json`` (every
raw number), both rewritten after every cell so an interrupted run leaves the partial
tables, and ``kernels.png`` when matplotlib imports. The short targets table is
printed last. ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is set to 0.5 (if unset) before JAX
starts, leaving half of the GPU to torch.

fla-core 0.6.0 refuses the backward of ``chunk_simple_gla`` and
``chunk_gated_delta_rule`` on Hopper with Triton < 3.7.1 (fla issue #640, a Triton
miscompile of a ``dot`` of a transposed accumulator). For timing only, the script sets
``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`` there, which runs the same
kernels: their gradients are then wrong, and the rows say so. ``chunk_gla`` is not
affected. The same bug class can reach the Pallas kernels through jaxlib's bundled
Triton, which is why the correctness check covers every gradient on the device.

On a lent H100 (the device tool: see DEVELOPERS.md), prepare the wheels here,
in the repository root (``.whl/`` and ``.deps/`` are git-ignored)::

    .venv/bin/pip wheel --no-deps -w .whl .                  # xformjax (with its kernels)
    .venv/bin/pip download fla-core==0.6.0 --no-deps -d .whl  # pure Python; needs einops,
                                                             # torch, triton: all there

then call the device tool's ``run`` with ``command="bash
experiments/bench/device_check.sh"``, ``carry=[".whl"]``, ``timeout_s=600``. It
installs the wheels into ``.deps``, copies the working tree's ``xformjax/`` and
``kernels/`` over the installed xformjax (so the code that travelled runs, even with
an older wheel), runs ``python3 -P -m experiments.bench.kernels --device-check --out
$OUT`` (``-P``: ``.deps`` before the tree on ``sys.path``, whose ``xformjax/`` lacks
the kernels) under ``timeout 540`` and tees the log to ``$OUT/kernels.log``; the files
come back under the reply's ``files_at``
(copy ``kernels.md``, ``.json`` and ``.png`` into ``experiments/results/``).
"""

from __future__ import annotations

import os

# Before JAX starts: leave half of the GPU to torch (fla), which shares the process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import pathlib
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xformjax import ops

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
OPS = ("simple_gla", "gla", "gated_delta_rule")
FLASH = "flash_attention"
IMPLS = ("pallas", "xla", "fla")
GATE_BIAS = 3.0  # gates log_sigmoid(N(0, 1) + 3): decays mostly 0.9–0.99, some far lower
FLA_KERNELS = {
    "simple_gla": "fla.ops.simple_gla.chunk_simple_gla",
    "gla": "fla.ops.gla.chunk_gla",
    "gated_delta_rule": "fla.ops.gated_delta_rule.chunk_gated_delta_rule",
}
FLA_640 = "fla #640 workaround: fwd+bwd gradients are wrong (timing only)"
FLA_640_OPS = ("simple_gla", "gated_delta_rule")  # their backward uses chunk_bwd_dqkwg
# The targets: H100, bf16, B=1, T=8192, H=16, K=V=128, pallas, median ms.
TARGET_SHAPE = (1, 8192)
ABSOLUTE_TARGETS = (
    ("simple_gla", "fwd", 0.3),
    ("simple_gla", "fwd+bwd", 1.0),
    ("gated_delta_rule", "fwd+bwd", 1.5),
    ("gla", "fwd+bwd", 2.0),
)
FLASH_FROM = 2048  # faster than flash attention in fwd+bwd from this T on
FLA_RATIO = 1.3  # pallas within this factor of fla where fla runs


@dataclasses.dataclass(frozen=True)
class Shape:
    """A problem size: batch, length, heads, key and value width."""

    batch: int
    length: int
    heads: int
    key: int
    value: int

    def __str__(self) -> str:
        return f"B={self.batch} T={self.length} H={self.heads} K={self.key} V={self.value}"


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run and the time limits (the defaults are the device check's)."""

    batches: tuple[int, ...] = (1, 8)
    lengths: tuple[int, ...] = (2048, 8192, 32768)
    heads: int = 16
    dim: int = 128
    check_shapes: tuple[Shape, ...] = (Shape(1, 512, 4, 128, 128), Shape(2, 100, 3, 20, 12))
    tolerance: float = 5e-3
    warmup: int = 3  # calls after the first (at most ``warmup_s``)
    warmup_s: float = 1.0
    repeats: int = 20  # timed samples at least (unless the cell's budget runs out) …
    min_runs: int = 5  # … but never fewer than this
    max_runs: int = 200
    min_time_s: float = 0.3  # fast cells keep sampling until this much time is spent
    min_sample_s: float = 2e-3  # one sample runs back-to-back calls adding up to this
    max_inner: int = 16
    cell_budget_s: float = 3.0  # sampling time of one measurement (compile not counted)
    budget_s: float = math.inf  # the whole run; later cells are skipped
    matmul_size: int = 8192
    copy_bytes: int = 1 << 30
    fla: bool = True
    plot: bool = True


def smoke_options(budget_s: float, fla: bool = True) -> Options:
    """Tiny shapes and one sample: checks the harness anywhere (interpreted on a CPU)."""
    return Options(
        batches=(1,),
        lengths=(64,),
        heads=2,
        dim=32,
        check_shapes=(Shape(1, 64, 2, 32, 32), Shape(2, 37, 3, 20, 12)),
        warmup=0,
        repeats=1,
        min_runs=1,
        max_runs=1,
        min_time_s=0.0,
        min_sample_s=0.0,
        max_inner=1,
        cell_budget_s=1.0,
        budget_s=budget_s,
        matmul_size=256,
        copy_bytes=1 << 20,
        fla=fla,
    )


@dataclasses.dataclass(frozen=True)
class Timing:
    """One measurement: median ms over ``runs`` samples of ``inner`` calls each."""

    ms: float
    runs: int
    inner: int
    first_s: float  # the first call (compilation, autotuning) in seconds


@dataclasses.dataclass(frozen=True)
class Cell:
    """A timing row: one op, implementation and shape; a time is ``None`` on error."""

    op: str
    impl: str
    batch: int
    length: int
    fwd: Timing | None
    fwd_bwd: Timing | None
    note: str = ""

    @property
    def fwd_ms(self) -> float | None:
        return None if self.fwd is None else self.fwd.ms

    @property
    def fwd_bwd_ms(self) -> float | None:
        return None if self.fwd_bwd is None else self.fwd_bwd.ms


@dataclasses.dataclass(frozen=True)
class Check:
    """A correctness row: relative errors of the output, state and each gradient."""

    op: str
    shape: Shape
    errors: dict[str, float]
    tolerance: float
    error: str = ""

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=math.inf)

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.errors) and self.worst <= self.tolerance


@dataclasses.dataclass
class Report:
    """Everything measured so far; :meth:`save` rewrites the markdown and the JSON."""

    out: pathlib.Path | None
    options: Options
    command: str
    environment: dict[str, Any]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    ceilings: dict[str, Any] = dataclasses.field(default_factory=dict)
    checks: list[Check] = dataclasses.field(default_factory=list)
    cells: list[Cell] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    status: str = "running"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "kernels.md").write_text(markdown(self))
        (self.out / "kernels.json").write_text(json.dumps(to_json(self), indent=1) + "\n")


# ---------------------------------------------------------------------------- inputs


def op_inputs(
    op: str, shape: Shape, dtype: Any, seed: int, *, state: bool = False
) -> dict[str, jax.Array]:
    """Random inputs of ``op`` (never zeros): q, k, v and β in ``dtype``; the gate and
    the initial state in float32. Keys (and queries) of the delta rule are L2-normalised."""
    keys = jax.random.split(jax.random.key(seed), 6)
    b, t, h, dk, dv = shape.batch, shape.length, shape.heads, shape.key, shape.value
    q = jax.random.normal(keys[0], (b, t, h, dk))
    k = jax.random.normal(keys[1], (b, t, h, dk))
    v = jax.random.normal(keys[2], (b, t, h, dv))
    if op == "gated_delta_rule":
        q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    args = {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype)}
    if op != FLASH:
        gate_shape = (b, t, h, dk) if op == "gla" else (b, t, h)
        gate = jax.nn.log_sigmoid(jax.random.normal(keys[3], gate_shape) + GATE_BIAS)
        args["gk" if op == "gla" else "g"] = gate
    if op == "gated_delta_rule":
        args["beta"] = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h))).astype(dtype)
    if state:
        args["h0"] = 0.1 * jax.random.normal(keys[5], (b, h, dk, dv))
    return args


def call_op(
    op: str, backend: str, args: dict[str, jax.Array], *, final: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """``op`` through the public API: ``(o, final_state or None)``."""
    q, k, v, h0 = args["q"], args["k"], args["v"], args.get("h0")
    common = dict(initial_state=h0, output_final_state=final, backend=backend)
    if op == "simple_gla":
        return ops.linear_attention(q, k, v, g=args["g"], **common)
    if op == "gla":
        return ops.linear_attention(q, k, v, gk=args["gk"], **common)
    if op == "gated_delta_rule":
        return ops.delta_rule(q, k, v, args["beta"], g=args["g"], **common)
    raise ValueError(op)


def pallas_gap(args: dict[str, jax.Array]) -> str | None:
    """Why ``backend="pallas"`` would run XLA on these inputs (``None``: the kernel runs)."""
    try:
        from xformjax.ops.common import kernel_gap
    except ImportError:  # the library moved it: nothing to say
        return None
    arrays = (args["q"], args["k"], args["v"], args.get("g"), args.get("gk"), args.get("h0"))
    return kernel_gap(arrays, None, {})


def flash(args: dict[str, jax.Array]) -> jax.Array:
    """Causal softmax attention, cuDNN."""
    return jax.nn.dot_product_attention(
        args["q"], args["k"], args["v"], is_causal=True, implementation="cudnn"
    )


# ---------------------------------------------------------------------------- timing


def measure(
    once: Callable[[], None], sample: Callable[[int], float], opts: Options, deadline: float
) -> Timing:
    """First call (compilation), warm-up, then samples until ≥ ``repeats`` and
    ``min_time_s`` (or the cell's budget with ≥ ``min_runs``); each sample times
    ``inner`` back-to-back calls so that dispatch overlaps the device's work."""
    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(opts.warmup):
        once()
        if time.perf_counter() - start >= opts.warmup_s:
            break
    start = time.perf_counter()
    once()
    single = time.perf_counter() - start
    inner = max(1, min(opts.max_inner, math.ceil(opts.min_sample_s / max(single, 1e-7))))
    samples: list[float] = []
    start = time.perf_counter()
    stop = min(start + opts.cell_budget_s, deadline)
    while len(samples) < opts.max_runs:
        samples.append(sample(inner) / inner)
        now = time.perf_counter()
        if len(samples) >= opts.repeats and now - start >= opts.min_time_s:
            break
        if now >= stop and len(samples) >= opts.min_runs:
            break
    return Timing(statistics.median(samples) * 1e3, len(samples), inner, first)


def jax_timer(fn: Callable[..., Any], *args: Any) -> tuple[Callable[[], None], Callable]:
    """``once`` and ``sample`` of a jitted function."""

    def once() -> None:
        jax.block_until_ready(fn(*args))

    def sample(inner: int) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)  # one stream: the last result is ready after all of them
        jax.block_until_ready(out)
        return time.perf_counter() - start

    return once, sample


def torch_timer(fn: Callable[[], Any]) -> tuple[Callable[[], None], Callable]:
    """``once`` and ``sample`` of a torch callable, timed with CUDA events."""
    import torch

    def once() -> None:
        fn()
        torch.cuda.synchronize()

    def sample(inner: int) -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    return once, sample


def jax_cell(op: str, impl: str, shape: Shape, opts: Options, deadline: float) -> Cell:
    """Forward and forward+backward time of a JAX implementation (pallas, xla, flash)."""
    args = op_inputs(op, shape, jnp.bfloat16, seed=1)
    names = list(args)
    if op == FLASH:
        fn = lambda *xs: flash(dict(zip(names, xs)))
    else:
        fn = lambda *xs: call_op(op, impl, dict(zip(names, xs)))[0]
    values = tuple(args.values())
    cotangent = jax.random.normal(jax.random.key(2), jax.eval_shape(fn, *values).shape)
    cotangent = cotangent.astype(jnp.bfloat16)
    gap = pallas_gap(args) if impl == "pallas" else None
    forward = jax.jit(fn)
    backward = jax.jit(lambda xs, do: jax.vjp(fn, *xs)[1](do))
    return timed_pair(
        op,
        impl,
        shape,
        lambda: measure(*jax_timer(forward, *values), opts, deadline),
        lambda: measure(*jax_timer(backward, values, cotangent), opts, deadline),
        deadline,
        f"pallas runs XLA here: {gap}" if gap else "",
    )


def timed_pair(
    op: str,
    impl: str,
    shape: Shape,
    fwd: Callable[[], Timing],
    fwd_bwd: Callable[[], Timing],
    deadline: float,
    note: str = "",
) -> Cell:
    """Both measurements, each guarded: an error or the spent budget goes to the note."""
    results: list[Timing | None] = []
    notes = [note] if note else []
    for label, measurement in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if time.perf_counter() >= deadline:
            results.append(None)
            notes.append(f"{label}: skipped, total budget spent")
            continue
        try:
            results.append(measurement())
        except Exception as error:  # OOM, compile error, a backend missing here, fla refusing
            results.append(None)
            notes.append(f"{label}: {describe(error)}")
    return Cell(op, impl, shape.batch, shape.length, results[0], results[1], "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class Fla:
    """fla's kernels (or why they are missing) and whether the #640 guard was lifted."""

    kernels: dict[str, Callable[..., Any]]
    patched: bool = False
    missing: str = ""


def load_fla(enabled: bool) -> Fla:
    """Import torch and fla; on Hopper with Triton < 3.7.1 lift fla's #640 refusal."""
    if not enabled:
        return Fla({}, missing="not run (--no-fla)")
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as error:
        return Fla({}, missing=f"not installed ({error.name or error})")
    except Exception as error:  # fla's import probing the GPU, say
        return Fla({}, missing=f"import failed: {describe(error)}")
    if not torch.cuda.is_available():
        return Fla({}, missing="not run: torch sees no CUDA device")
    kernels = {
        "simple_gla": chunk_simple_gla,
        "gla": chunk_gla,
        "gated_delta_rule": chunk_gated_delta_rule,
    }
    patched = False
    with contextlib.suppress(ImportError):
        import fla.ops.common.chunk_o as chunk_o

        refuses = (
            getattr(chunk_o, "IS_NVIDIA_HOPPER", False)
            and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
            and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True)
        )
        if refuses:
            chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: the gradients are then wrong
            patched = True
    return Fla(kernels, patched)


def fla_cell(op: str, shape: Shape, fla: Fla, opts: Options, deadline: float) -> Cell:
    """Forward and forward+backward time of fla's kernel on the same kind of inputs."""
    if fla.missing:
        return Cell(op, "fla", shape.batch, shape.length, None, None, fla.missing)
    import torch

    try:
        return _fla_cell(op, shape, fla, opts, deadline)
    except Exception as error:  # making the inputs ran out of memory, say
        return Cell(op, "fla", shape.batch, shape.length, None, None, describe(error))
    finally:
        torch.cuda.empty_cache()  # the inputs are gone: leave the memory to JAX's next cells


def _fla_cell(op: str, shape: Shape, fla: Fla, opts: Options, deadline: float) -> Cell:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device="cuda").manual_seed(1)
    randn = lambda *size: torch.randn(size, generator=generator, device="cuda")
    b, t, h, dk, dv = shape.batch, shape.length, shape.heads, shape.key, shape.value
    q, k, v = randn(b, t, h, dk), randn(b, t, h, dk), randn(b, t, h, dv)
    if op == "gated_delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    gate = F.logsigmoid((randn(b, t, h, dk) if op == "gla" else randn(b, t, h)) + GATE_BIAS)
    leaves = [q, k, v, gate.requires_grad_()]
    kernel = fla.kernels[op]
    if op == "gated_delta_rule":
        beta = torch.sigmoid(randn(b, t, h)).to(torch.bfloat16).requires_grad_()
        leaves.append(beta)
        call = lambda: kernel(q, k, v, g=gate, beta=beta)[0]
    else:
        call = lambda: kernel(q, k, v, g=gate)[0]
    cotangent = randn(b, t, h, dv).to(torch.bfloat16)

    def forward() -> None:
        with torch.no_grad():
            call()

    def forward_backward() -> None:
        torch.autograd.grad(call(), leaves, cotangent)

    note = FLA_640 if fla.patched and op in FLA_640_OPS else ""
    return timed_pair(
        op,
        "fla",
        shape,
        lambda: measure(*torch_timer(forward), opts, deadline),
        lambda: measure(*torch_timer(forward_backward), opts, deadline),
        deadline,
        note,
    )


# ---------------------------------------------------------------------------- sections


def ceilings(opts: Options) -> dict[str, Any]:
    """bf16 matmul TFLOP/s and copy TB/s (bytes read + written), median of samples."""
    n = opts.matmul_size
    a, b = (
        jax.random.normal(key, (n, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(3))
    )
    matmul = measure(*jax_timer(jax.jit(jnp.matmul), a, b), opts, math.inf)
    count = opts.copy_bytes // 4
    x = jax.random.normal(jax.random.key(4), (count,), jnp.float32)
    copy = measure(*jax_timer(jax.jit(lambda x: x * 2.0 + 1.0), x), opts, math.inf)
    return {
        "matmul_size": n,
        "matmul_ms": matmul.ms,
        "matmul_tflops": 2 * n**3 / (matmul.ms / 1e3) / 1e12,
        "copy_bytes": count * 4,
        "copy_ms": copy.ms,
        "copy_tbps": 2 * count * 4 / (copy.ms / 1e3) / 1e12,
    }


def value_and_pullback(fn: Callable[..., Any], xs: tuple, cotangent: Any) -> tuple[Any, Any]:
    """``fn(*xs)`` and the gradients of every ``xs`` for ``cotangent``."""
    out, pullback = jax.vjp(fn, *xs)
    return out, pullback(cotangent)


def relative_error(a: jax.Array, b: jax.Array) -> float:
    """max |a − b| / max |b| (absolute where b is all zeros; inf where not finite)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    error = float(np.max(np.abs(a64 - b64), initial=0.0))
    scale = float(np.max(np.abs(b64), initial=0.0))
    value = error / scale if scale > 0 else error
    return value if math.isfinite(value) else math.inf


def check(op: str, shape: Shape, opts: Options) -> Check:
    """Pallas against XLA in float32: output, final state and every input's gradient."""
    try:
        args = op_inputs(op, shape, jnp.float32, seed=5, state=True)
        names = list(args)
        values = tuple(args.values())
        fn = lambda *xs, backend: call_op(op, backend, dict(zip(names, xs)), final=True)
        gap = pallas_gap(args)
        if gap:
            return Check(op, shape, {}, opts.tolerance, f"pallas runs XLA here: {gap}")
        shapes = jax.eval_shape(functools.partial(fn, backend="xla"), *values)
        keys = jax.random.split(jax.random.key(6), len(shapes))
        cotangents = tuple(jax.random.normal(key, s.shape) for key, s in zip(keys, shapes))
        results = {}
        for backend in ("pallas", "xla"):
            both = jax.jit(
                functools.partial(value_and_pullback, functools.partial(fn, backend=backend))
            )
            results[backend] = jax.block_until_ready(both(values, cotangents))
        (o_p, s_p), grads_p = results["pallas"]
        (o_x, s_x), grads_x = results["xla"]
        errors = {"o": relative_error(o_p, o_x), "state": relative_error(s_p, s_x)}
        for name, gp, gx in zip(names, grads_p, grads_x):
            errors[f"d{name}"] = relative_error(gp, gx)
        return Check(op, shape, errors, opts.tolerance)
    except Exception as error:
        return Check(op, shape, {}, opts.tolerance, describe(error))


def timing_plan(opts: Options) -> list[tuple[str, str, Shape]]:
    """Every timing cell, the target shape (B=1, T=8K) first, then B=1, then the rest."""
    shapes = [
        Shape(b, t, opts.heads, opts.dim, opts.dim) for b in opts.batches for t in opts.lengths
    ]
    shapes.sort(key=lambda s: ((s.batch, s.length) != TARGET_SHAPE, s.batch, s.length))
    return [
        (op, impl, shape)
        for shape in shapes
        for op, impl in [(op, impl) for op in OPS for impl in IMPLS] + [(FLASH, "cudnn")]
    ]


def describe(error: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}".replace("|", "/")


def environment() -> dict[str, Any]:
    """Device, library versions and date."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device.device_kind),
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "host": platform.node(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "jax_cuda_plugin": version("jax-cuda13-plugin") or version("jax-cuda12-plugin"),
        "triton": version("triton"),
        "torch": version("torch"),
        "fla": version("fla-core"),
        "xformjax": version("xformjax"),
        "xformjax_path": str(pathlib.Path(ops.__file__).resolve().parents[1]),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    with contextlib.suppress(Exception):
        stats = device.memory_stats() or {}
        info["jax_memory_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    return info


# ---------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def index(cells: Sequence[Cell]) -> dict[tuple[str, str, int, int], Cell]:
    return {(c.op, c.impl, c.batch, c.length): c for c in cells}


def speedups(cell: Cell, cells: dict) -> tuple[float | None, float | None, float | None]:
    """fwd+bwd speedup vs flash, fwd and fwd+bwd speedups vs fla (> 1: this is faster)."""
    ratio = lambda a, b: None if a is None or b is None else a / b
    flash_cell = cells.get((FLASH, "cudnn", cell.batch, cell.length))
    fla_cell_ = cells.get((cell.op, "fla", cell.batch, cell.length))
    vs_flash = ratio(flash_cell and flash_cell.fwd_bwd_ms, cell.fwd_bwd_ms)
    vs_fla = (
        ratio(fla_cell_ and fla_cell_.fwd_ms, cell.fwd_ms),
        ratio(fla_cell_ and fla_cell_.fwd_bwd_ms, cell.fwd_bwd_ms),
    )
    return (None if cell.op == FLASH else vs_flash), *vs_fla


def targets(cells: Sequence[Cell], fla_patched: bool) -> list[dict[str, Any]]:
    """The issue's targets against the Pallas rows: measured value and pass/fail
    (``None`` where nothing was measured)."""
    by = index(cells)
    rows = []
    batch, length = TARGET_SHAPE
    for op, kind, limit in ABSOLUTE_TARGETS:
        cell = by.get((op, "pallas", batch, length))
        value = None if cell is None else (cell.fwd_ms if kind == "fwd" else cell.fwd_bwd_ms)
        rows.append(
            {
                "target": f"{op} {kind} ≤ {limit} ms (B={batch}, T={length})",
                "measured": None if value is None else f"{value:.3f} ms",
                "passed": None if value is None else value <= limit,
            }
        )
    for op in OPS:
        pairs = []
        for cell in cells:
            if cell.op == op and cell.impl == "pallas" and cell.length >= FLASH_FROM:
                other = by.get((FLASH, "cudnn", cell.batch, cell.length))
                if cell.fwd_bwd_ms and other and other.fwd_bwd_ms:
                    pairs.append((other.fwd_bwd_ms / cell.fwd_bwd_ms, cell))
        worst = min(pairs, key=lambda p: p[0]) if pairs else None
        rows.append(
            {
                "target": f"{op} fwd+bwd faster than flash attention, T ≥ {FLASH_FROM}",
                "measured": None
                if worst is None
                else f"least speedup {worst[0]:.2f}× (B={worst[1].batch}, "
                f"T={worst[1].length}; {len(pairs)} shapes)",
                "passed": None if worst is None else worst[0] > 1,
            }
        )
    for op in OPS:
        pairs = []
        for cell in cells:
            other = by.get((op, "fla", cell.batch, cell.length))
            if cell.op != op or cell.impl != "pallas" or other is None:
                continue
            for kind, mine, theirs in (
                ("fwd", cell.fwd_ms, other.fwd_ms),
                ("fwd+bwd", cell.fwd_bwd_ms, other.fwd_bwd_ms),
            ):
                if mine and theirs:
                    pairs.append((mine / theirs, kind, cell))
        worst = max(pairs, key=lambda p: p[0]) if pairs else None
        caveat = (
            " (fla's gradients wrong: #640 workaround)" if fla_patched and op in FLA_640_OPS else ""
        )
        rows.append(
            {
                "target": f"{op} within {FLA_RATIO}× of fla",
                "measured": None
                if worst is None
                else f"most {worst[0]:.2f}× fla's time ({worst[1]}, B={worst[2].batch}, "
                f"T={worst[2].length}; {len(pairs)} cells){caveat}",
                "passed": None if worst is None else worst[0] <= FLA_RATIO,
            }
        )
    return rows


def verdict(passed: bool | None) -> str:
    return "—" if passed is None else ("pass" if passed else "FAIL")


def ceiling_table(report: Report) -> list[str]:
    c = report.ceilings
    if not c:
        return ["(not measured)"]
    if "error" in c:
        return [f"error: {c['error']}"]
    return [
        "| ceiling | value |",
        "|---|---|",
        f"| bf16 matmul {c['matmul_size']}³ | {c['matmul_tflops']:.1f} TFLOP/s "
        f"({c['matmul_ms']:.3f} ms) |",
        f"| copy {c['copy_bytes'] / 2**20:.0f} MiB (read + write) | {c['copy_tbps']:.2f} TB/s "
        f"({c['copy_ms']:.3f} ms) |",
    ]


CHECK_COLUMNS = ("o", "state", "dq", "dk", "dv", "dgate", "dbeta", "dh0")


def check_table(report: Report) -> list[str]:
    if not report.checks:
        return ["(not run)"]
    lines = [
        "| op | shape | " + " | ".join(CHECK_COLUMNS) + " | max | result |",
        "|---|---|" + "---|" * (len(CHECK_COLUMNS) + 2),
    ]
    for c in report.checks:
        errors = dict(c.errors)
        for gate in ("dg", "dgk"):
            if gate in errors:
                errors["dgate"] = errors.pop(gate)
        cells = [fmt(errors.get(name), 2) for name in CHECK_COLUMNS]
        result = verdict(c.passed) + (f": {c.error}" if c.error else "")
        lines.append(
            f"| {c.op} | {c.shape} | "
            + " | ".join(cells)
            + f" | {fmt(c.worst if c.errors else None, 2)} | {result} |"
        )
    return lines


def timing_table(report: Report) -> list[str]:
    if not report.cells:
        return ["(not run)"]
    by = index(report.cells)
    order = {name: i for i, name in enumerate((*OPS, FLASH))}
    impl_order = {name: i for i, name in enumerate((*IMPLS, "cudnn"))}
    lines = [
        "| B | T | op | impl | fwd ms | fwd+bwd ms | fwd+bwd vs flash | vs fla fwd | "
        "vs fla fwd+bwd | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in sorted(
        report.cells,
        key=lambda c: (c.batch, c.length, order.get(c.op, 9), impl_order.get(c.impl, 9)),
    ):
        vs_flash, fla_fwd, fla_fb = speedups(cell, by)
        x = lambda r, cell=cell: "—" if r is None or cell.impl == "fla" else f"{r:.2f}×"
        lines.append(
            f"| {cell.batch} | {cell.length} | {cell.op} | {cell.impl} | {fmt(cell.fwd_ms)} | "
            f"{fmt(cell.fwd_bwd_ms)} | {x(vs_flash)} | {x(fla_fwd)} | {x(fla_fb)} | {cell.note} |"
        )
    return lines


def target_table(report: Report) -> list[str]:
    lines = ["| target | measured | result |", "|---|---|---|"]
    for row in targets(report.cells, report.environment.get("fla_patched", False)):
        lines.append(f"| {row['target']} | {row['measured'] or '—'} | {verdict(row['passed'])} |")
    if report.checks:
        failed = [c for c in report.checks if not c.passed]
        summary = "all pass" if not failed else f"{len(failed)} of {len(report.checks)} FAIL"
        worst = max((c.worst for c in report.checks if c.errors), default=None)
        lines.append(
            f"| correctness, every output and gradient ≤ {report.options.tolerance:g} "
            f"(f32, pallas vs xla) | worst {fmt(worst, 2)} over {len(report.checks)} checks | "
            f"{'pass' if not failed else 'FAIL'}: {summary} |"
        )
    return lines


def markdown(report: Report) -> str:
    env, opts = report.environment, report.options
    versions = ", ".join(
        f"{name} {env.get(name) or '—'}"
        for name in ("jax", "jaxlib", "jax_cuda_plugin", "triton", "torch", "fla", "xformjax")
    )
    status = report.status if report.status != "running" else "partial (running)"
    lines = [
        f"# Kernel benchmark on {env['device']}",
        "",
        f"`{report.command}` — {env['date']}, {status}, {report.elapsed():.0f} s.",
        "",
        f"Versions: {versions}. The Pallas kernels are compiled by jaxlib's bundled "
        "Triton; `triton` is the Python package torch and fla use. JAX memory fraction "
        f"{env.get('mem_fraction')}"
        + (f" ({env['jax_memory_gib']} GiB)." if "jax_memory_gib" in env else "."),
        "",
        "## Ceilings",
        "",
        *ceiling_table(report),
        "",
        f'## Correctness (float32, `backend="pallas"` vs `"xla"`; max |a−b| / max |b|; '
        f"pass ≤ {opts.tolerance:g})",
        "",
        "`state`: the final state; `dgate`: d`g` or d`gk`; `dh0`: the initial state's gradient.",
        "",
        *check_table(report),
        "",
        f"## Timings (bf16, H={opts.heads}, K=V={opts.dim}; median ms)",
        "",
        f"Targets: `pallas` at B={TARGET_SHAPE[0]}, T={TARGET_SHAPE[1]}, and against flash "
        "attention and fla (speedup > 1: `pallas` or `xla` is faster)."
        + (
            " On a CPU the kernels run interpreted: these times mean nothing."
            if env.get("backend") == "cpu"
            else ""
        ),
        "",
        *target_table(report),
        "",
        *timing_table(report),
        "",
        "`flash_attention`: causal softmax attention, `jax.nn.dot_product_attention("
        'implementation="cudnn")`, on the same q, k, v. `fla`: '
        + ", ".join(f"`{v}`" for v in FLA_KERNELS.values())
        + ". fwd+bwd: the gradient of every input for a random cotangent.",
    ]
    lines += [f"\n{note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    asdict = lambda x: dataclasses.asdict(x) if x is not None else None
    return {
        "command": report.command,
        "status": report.status,
        "elapsed_s": round(report.elapsed(), 1),
        "environment": report.environment,
        "options": {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in dataclasses.asdict(report.options).items()
        },
        "ceilings": report.ceilings,
        "correctness": [
            {
                "op": c.op,
                "shape": dataclasses.asdict(c.shape),
                "errors": {k: (v if math.isfinite(v) else None) for k, v in c.errors.items()},
                "worst": c.worst if c.errors and math.isfinite(c.worst) else None,
                "tolerance": c.tolerance,
                "passed": c.passed,
                "error": c.error,
            }
            for c in report.checks
        ],
        "timings": [
            {
                "op": c.op,
                "impl": c.impl,
                "batch": c.batch,
                "length": c.length,
                "fwd": asdict(c.fwd),
                "fwd_bwd": asdict(c.fwd_bwd),
                "note": c.note,
            }
            for c in report.cells
        ],
        "targets": targets(report.cells, report.environment.get("fla_patched", False)),
        "notes": report.notes,
    }


def plot(report: Report, path: pathlib.Path) -> None:
    """fwd+bwd ms over T, one panel per op, flash attention in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(13, 4), squeeze=False)
    for axis, op in zip(axes[0], OPS):
        for impl_op, impl in [(op, impl) for impl in IMPLS] + [(FLASH, "cudnn")]:
            for batch, style in zip(report.options.batches, ("-", "--", ":")):
                points = sorted(
                    (c.length, c.fwd_bwd_ms)
                    for c in report.cells
                    if (c.op, c.impl, c.batch) == (impl_op, impl, batch) and c.fwd_bwd_ms
                )
                if points:
                    label = f"{'flash' if impl == 'cudnn' else impl} B={batch}"
                    axis.plot(*zip(*points), style, marker="o", label=label)
        axis.set(title=f"{op}, fwd+bwd", xlabel="T", ylabel="ms", xscale="log", yscale="log")
        if axis.lines:
            axis.legend(fontsize=7)
    fig.suptitle(report.environment["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def run(report: Report) -> None:
    """The three sections, saving after every step; the budget skips what is left."""
    opts = report.options
    deadline = report.started + opts.budget_s
    say = lambda text: print(f"[{report.elapsed():6.1f} s] {text}", flush=True)

    say(f"{report.environment['device']}: ceilings")
    try:
        report.ceilings = ceilings(opts)
        c = report.ceilings
        say(f"matmul {c['matmul_tflops']:.1f} TFLOP/s, copy {c['copy_tbps']:.2f} TB/s")
    except Exception as error:
        report.ceilings = {"error": describe(error)}
        say(f"ceilings failed: {describe(error)}")
    report.save()

    for op in OPS:
        for shape in opts.check_shapes:
            if time.perf_counter() >= deadline:
                report.checks.append(
                    Check(op, shape, {}, opts.tolerance, "skipped: total budget spent")
                )
                continue
            result = check(op, shape, opts)
            report.checks.append(result)
            worst = fmt(result.worst if result.errors else None, 2)
            say(f"check {op} {shape}: {verdict(result.passed)} (max {worst}) {result.error}")
            report.save()

    fla = load_fla(opts.fla)
    report.environment["fla_patched"] = fla.patched
    if fla.patched:
        report.notes.append(
            f"fla: `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` was set to True to run the "
            f"backward of {', '.join(FLA_640_OPS)} on Hopper with Triton < 3.7.1 (fla issue "
            "#640): their fwd+bwd times are of kernels whose gradients are wrong."
        )
    plan = timing_plan(opts)
    for number, (op, impl, shape) in enumerate(plan, 1):
        if time.perf_counter() >= deadline:
            cell = Cell(
                op, impl, shape.batch, shape.length, None, None, "skipped: total budget spent"
            )
        else:
            try:
                if impl == "fla":
                    cell = fla_cell(op, shape, fla, opts, deadline)
                else:
                    cell = jax_cell(op, impl, shape, opts, deadline)
            except Exception as error:  # making the inputs, tracing: the row says why
                cell = Cell(op, impl, shape.batch, shape.length, None, None, describe(error))
        report.cells.append(cell)
        say(
            f"{number:2d}/{len(plan)} {op}/{impl} B={shape.batch} T={shape.length}: "
            f"fwd {fmt(cell.fwd_ms)} ms, fwd+bwd {fmt(cell.fwd_bwd_ms)} ms"
            + (f"  [{cell.note}]" if cell.note else "")
        )
        report.save()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.kernels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--device-check",
        action="store_true",
        help="ceilings, correctness and timings under a total budget (default 400 s)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one sample: runs on a CPU too"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help="results folder (default experiments/results; a temporary one with --smoke)",
    )
    parser.add_argument("--budget", type=float, help="total seconds before cells are skipped")
    parser.add_argument("--no-fla", action="store_true", help="leave fla (torch) out")
    parser.add_argument("--no-plot", action="store_true", help="write no kernels.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (failed checks included: see the tables)."""
    args = parser().parse_args(argv)
    budget = args.budget if args.budget is not None else (400.0 if args.device_check else math.inf)
    if args.smoke:
        opts = smoke_options(budget, fla=not args.no_fla)
    else:
        if jax.default_backend() != "gpu":
            raise SystemExit(
                f"the kernel benchmark needs a GPU; this machine has "
                f"{jax.devices()[0].device_kind}. Use --smoke to check the harness."
            )
        opts = Options(budget_s=budget, fla=not args.no_fla)
    opts = dataclasses.replace(opts, plot=not args.no_plot)
    out = args.out
    if out is None:
        out = pathlib.Path(tempfile.mkdtemp(prefix="kernels-")) if args.smoke else RESULTS
    command = "python -m experiments.bench.kernels " + " ".join(
        a
        for a in ("--device-check" if args.device_check else "", "--smoke" if args.smoke else "")
        if a
    )
    report = Report(out, opts, command.strip(), environment())
    print(f"{report.environment['device']}; results in {out}", flush=True)
    try:
        run(report)
        report.status = "complete"
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    finally:
        if report.status == "running":
            report.status = "failed"
        report.save()
        if opts.plot and report.cells:
            try:
                plot(report, out / "kernels.png")
            except Exception as error:  # no matplotlib on the device: optional
                print(f"no plot: {describe(error)}", flush=True)
        print("\n" + "\n".join(ceiling_table(report)), flush=True)
        print("\n" + "\n".join(check_table(report)), flush=True)
        print("\n" + "\n".join(timing_table(report)), flush=True)
        print("\n" + "\n".join(target_table(report)), flush=True)
        print(f"\n{report.status} in {report.elapsed():.0f} s; {out / 'kernels.md'}", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` still leaves the partial tables
    sys.exit(main())
