"""Op benchmark: forward and forward+backward time and memory of every form over T.

    python -m experiments.bench.ops                 # full run (about 11 minutes on 2 cores)
    python -m experiments.bench.ops --quick         # T ∈ {1K, 4K}: a smoke run
    python -m experiments.bench.ops --ops delta_product   # one op's forms only
    python -m experiments.bench                     # the suite: this, then the layer benchmark

For ``linear_attention``, the gated ``delta_rule`` (``g`` gate, β in (0, 1)),
the per-channel gated delta rule (``gk`` gate, "delta_rule_gk"),
``delta_product`` (``g`` gate, two Householder steps per token) and causal
``softmax_attention``, in each mode, at B=1, H=4, K=V=64, float32: best-of-N
wall time of the jitted forward and of ``grad`` (forward+backward), and XLA's
planned temporary memory (``compile().memory_analysis()``). Quadratic forms run
only where they fit; ``--ops`` picks a subset.
Writes ``ops.md`` (tables + the issue's target figures), ``ops.json`` and
``ops.png`` to ``experiments/results/``.

The process re-executes itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(transparent huge pages for malloc) unless ``--no-hugepages`` is given. Without
it, buffers above glibc's 32 MiB mmap threshold are page-faulted 4 KiB at a time
on every call, which on this VM costs ~5 GB/s and makes long sequences look
slower per token for reasons that have nothing to do with the algorithm. The
tunable in effect is recorded with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time

HUGEPAGES = "glibc.malloc.hugetlb=1"


def reexec_with_hugepages(argv: list[str], module: str = "experiments.bench.ops") -> None:
    """Replace this process with ``python -m module *argv`` under ``HUGEPAGES``
    unless the tunable is already in effect or ``--no-hugepages`` is in ``argv``
    (the other benchmarks call it too, with their own module)."""
    if HUGEPAGES in os.environ.get("GLIBC_TUNABLES", "") or "--no-hugepages" in argv:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGEPAGES]))
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from xformjax import ops  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
BATCH, HEADS, DIM, CHUNK = 1, 4, 64, 64
HOUSEHOLDER = 2  # delta_product's sub-steps per token: k, v and β carry T·2 rows
# Largest T each (op, mode) runs at; quadratic forms stop where they stop fitting
# (or stop finishing in seconds) on a 2-core, 24 GiB machine.
MAX_LENGTH = {
    ("delta_rule", "chunk"): 65536,
    ("delta_rule", "recurrent"): 16384,
    ("delta_rule", "parallel"): 4096,
    ("delta_rule_gk", "chunk"): 65536,
    ("delta_rule_gk", "recurrent"): 16384,
    ("delta_rule_gk", "parallel"): 4096,
    ("delta_product", "chunk"): 65536,
    ("delta_product", "recurrent"): 16384,
    ("delta_product", "parallel"): 2048,
    ("linear_attention", "chunk"): 65536,
    ("linear_attention", "recurrent"): 65536,
    ("linear_attention", "parallel"): 4096,
    ("softmax_attention", "chunk"): 16384,
    ("softmax_attention", "parallel"): 8192,
    ("softmax_attention", "recurrent"): 4096,
}


@dataclasses.dataclass(frozen=True)
class Row:
    op: str
    mode: str
    length: int
    forward_ms: float
    backward_ms: float  # forward + backward
    forward_temp_mib: float
    backward_temp_mib: float

    @property
    def us_per_token(self) -> float:
        return self.backward_ms * 1e3 / self.length


def best_time(fn, *args, repeats: int, budget_s: float = 3.0) -> float:
    """Best of at least ``repeats`` calls after a warm-up, sampling for ``budget_s``
    seconds (at most 1000 calls) so that neither a short call nor a burst of other
    load on the machine (one 32K run once read 28 % slow over 1.5 s of samples)
    decides the figure; a call slower than a second runs twice."""
    jax.block_until_ready(fn(*args))
    times: list[float] = []
    started = time.perf_counter()
    while True:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        if times[0] >= 1.0 and len(times) >= 2:
            break
        if len(times) >= repeats and (
            time.perf_counter() - started >= budget_s or len(times) >= 1000
        ):
            break
    return min(times)


def matmul_gflops() -> float:
    """Best-of-30 float32 1024³ matmul rate: the denominator of the throughput target."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
    seconds = best_time(jax.jit(lambda x, y: x @ y), a, a, repeats=30)
    return 2 * 1024**3 / seconds / 1e9


def useful_flops(op: str, length: int) -> float:
    """Useful FLOPs of the chunk form's forward, per the issues: linear attention
    2·T·(C·K + C·V + 2·K·V) per head; the delta rule 2·T·(3·C·K + 2·C·V + 3·K·V) + T·C²."""
    if op == "delta_rule":
        per_head = 2 * length * (3 * CHUNK * DIM + 2 * CHUNK * DIM + 3 * DIM * DIM)
        return (per_head + length * CHUNK**2) * HEADS
    return 2 * length * (CHUNK * DIM + CHUNK * DIM + 2 * DIM * DIM) * HEADS


def make_fn(op: str, mode: str):
    """``fn(q, k, v, gate, beta) -> output`` for ``op`` in ``mode``."""
    if op == "linear_attention":
        return lambda q, k, v, g, beta: ops.linear_attention(
            q, k, v, g=g, mode=mode, chunk_size=CHUNK
        )[0]
    if op == "delta_rule":
        return lambda q, k, v, g, beta: ops.delta_rule(
            q, k, v, beta, g=g, mode=mode, chunk_size=CHUNK
        )[0]
    if op == "delta_rule_gk":
        return lambda q, k, v, gk, beta: ops.delta_rule(
            q, k, v, beta, gk=gk, mode=mode, chunk_size=CHUNK
        )[0]
    if op == "delta_product":
        return lambda q, k, v, g, beta: ops.delta_product(
            q, k, v, beta, num_householder=HOUSEHOLDER, g=g, mode=mode, chunk_size=CHUNK
        )[0]
    return lambda q, k, v, g, beta: ops.softmax_attention(q, k, v, mode=mode, chunk_size=128)[0]


def make_inputs(op: str, length: int) -> tuple[jax.Array, ...]:
    """``(q, k, v, gate, beta)`` at B=1, H=4, K=V=64: unit keys (the delta rule's
    keys are unit), a log gate per head in log(0.9 .. 0.999) (per channel for
    ``delta_rule_gk``), β in (0, 1); ``delta_product``'s k, v, β carry T·n rows."""
    rng = np.random.default_rng(0)
    rows = length * HOUSEHOLDER if op == "delta_product" else length

    def normal(steps: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((BATCH, steps, HEADS, DIM)), jnp.float32)

    q, k, v = normal(length), normal(rows), normal(rows)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    gate_shape = (BATCH, length, HEADS) + ((DIM,) if op == "delta_rule_gk" else ())
    gate = jnp.asarray(np.log(rng.uniform(0.9, 0.999, gate_shape)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (BATCH, rows, HEADS)), jnp.float32)
    return q, k, v, gate, beta


def measure(op: str, mode: str, length: int, repeats: int, sample_seconds: float) -> Row:
    fn = make_fn(op, mode)
    args = make_inputs(op, length)
    forward = jax.jit(fn)
    differentiable = (
        (0, 1, 2, 3) if op in ("linear_attention", "softmax_attention") else (0, 1, 2, 3, 4)
    )
    backward = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=differentiable))
    compiled = [f.lower(*args).compile() for f in (forward, backward)]  # compiled once
    timed = [best_time(f, *args, repeats=repeats, budget_s=sample_seconds) * 1e3 for f in compiled]
    temp = [f.memory_analysis().temp_size_in_bytes / 2**20 for f in compiled]
    return Row(op, mode, length, *timed, *temp)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: keep platform's answer
        models = [
            line.split(":", 1)[1].strip()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "date": datetime.date.today().isoformat(),
    }


def targets(rows: list[Row], gflops: float) -> list[tuple[str, str, bool]]:
    by = {(r.op, r.mode, r.length): r for r in rows}
    out = []
    for op, memory_kib in (("linear_attention", 16), ("delta_rule", 32)):
        chunk_4k = by.get((op, "chunk", 4096))
        if chunk_4k:
            rate = 3 * useful_flops(op, 4096) / (chunk_4k.backward_ms / 1e3) / 1e9
            out.append(
                (
                    f"{op}: chunk fwd+bwd at 4K vs 1024³ matmul (target ≥ 20 %)",
                    f"{rate:.1f} GFLOP/s = {100 * rate / gflops:.1f} % of {gflops:.0f}",
                    rate >= 0.2 * gflops,
                )
            )
        chunk_32k = by.get((op, "chunk", 32768))
        if chunk_4k and chunk_32k:
            ratio = chunk_32k.us_per_token / chunk_4k.us_per_token
            out.append(
                (
                    f"{op}: chunk fwd+bwd time per token, 32K / 4K (target ≤ 1.15)",
                    f"{chunk_32k.us_per_token:.2f} / {chunk_4k.us_per_token:.2f} µs = {ratio:.2f}",
                    ratio <= 1.15,
                )
            )
        chunk_rows = [r for r in rows if r.op == op and r.mode == "chunk"]
        if chunk_rows:
            per_token = max(r.backward_temp_mib * 1024 / r.length for r in chunk_rows)
            out.append(
                (
                    f"{op}: chunk fwd+bwd temporary memory per token (target ≤ {memory_kib} KiB)",
                    f"{per_token:.2f} KiB (worst T)",
                    per_token <= memory_kib,
                )
            )
        parallel_4k = by.get((op, "parallel", 4096))
        if chunk_4k and parallel_4k:
            speedup = parallel_4k.backward_ms / chunk_4k.backward_ms
            out.append(
                (
                    f"{op}: chunk vs parallel fwd+bwd at 4K (target ≥ 15×)",
                    f"{speedup:.1f}×",
                    speedup >= 15,
                )
            )
    return out


def linearity(rows: list[Row]) -> list[str]:
    """Markdown rows, one per op with a chunk form: fwd+bwd time per token at the
    longest T over that at 4K, and the worst temporary memory per token."""
    lines = []
    for op in sorted({r.op for r in rows if r.mode == "chunk"}):
        chunk = sorted((r for r in rows if (r.op, r.mode) == (op, "chunk")), key=lambda r: r.length)
        base = next((r for r in chunk if r.length == 4096), chunk[0])
        longest = chunk[-1]
        per_token = max(r.backward_temp_mib * 1024 / r.length for r in chunk)
        lines.append(
            f"| {op} | {longest.length} / {base.length} | "
            f"{longest.us_per_token / base.us_per_token:.2f} | {per_token:.2f} |"
        )
    return lines


def markdown(rows: list[Row], gflops: float, info: dict) -> str:
    lines = [
        "# Op benchmark",
        "",
        f"`python -m experiments.bench.ops` — {info['date']}, {info['cpu']}, "
        f"{info['cores']} cores, jax {info['jax']} ({info['backend']}), "
        f"GLIBC_TUNABLES=`{info['glibc_tunables'] or 'unset'}`.",
        f"B={BATCH}, H={HEADS}, K=V={DIM}, float32; linear attention and the delta "
        f"rule (unit keys, β in (0, 1)) with a `g` [B,T,H] gate and chunk {CHUNK}; "
        "`delta_rule_gk`: the delta rule with a per-channel `gk` [B,T,H,K] gate "
        f"instead; `delta_product`: {HOUSEHOLDER} Householder steps per token (k, v, "
        f"β carry T·{HOUSEHOLDER} rows) with a `g` gate; "
        "softmax attention causal, block 128. "
        "Times are the best of several runs; memory is XLA's planned temporary "
        "buffer size.",
        "",
        f"1024³ float32 matmul in the same process: **{gflops:.0f} GFLOP/s** (best of "
        "30, measured before and after the runs; the higher is used).",
        "",
        "## Targets",
        "",
        "| figure | measured | met |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {value} | {'yes' if ok else '**no**'} |"
        for name, value, ok in targets(rows, gflops)
    ]
    lines += [
        "",
        "## Linear in T",
        "",
        "Every chunk form, fwd+bwd: time per token at the longest T over that at 4K "
        "(1.00 = linear), and the worst temporary memory per token over T.",
        "",
        "| op | T / T | time per token ratio | temp KiB/token (worst) |",
        "|---|---|---:|---:|",
    ]
    lines += linearity(rows)
    lines += [
        "",
        "## All measurements",
        "",
        "| op | mode | T | fwd ms | fwd+bwd ms | fwd+bwd µs/token | fwd temp MiB "
        "| fwd+bwd temp MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.op} | {r.mode} | {r.length} | {r.forward_ms:.2f} | {r.backward_ms:.2f} | "
        f"{r.us_per_token:.2f} | {r.forward_temp_mib:.1f} | {r.backward_temp_mib:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for op, mode in sorted({(r.op, r.mode) for r in rows}):
        series = [r for r in rows if (r.op, r.mode) == (op, mode)]
        lengths = [r.length for r in series]
        label = f"{op.replace('_attention', '')} {mode}"
        time_ax.plot(lengths, [r.us_per_token for r in series], "o-", label=label)
        mem_ax.plot(lengths, [r.backward_temp_mib for r in series], "o-", label=label)
    time_ax.set(
        xscale="log",
        yscale="log",
        xlabel="T (tokens)",
        ylabel="fwd+bwd time per token (µs)",
        title="Time per token (flat = linear)",
    )
    mem_ax.set(
        xscale="log",
        yscale="log",
        xlabel="T (tokens)",
        ylabel="fwd+bwd temporary memory (MiB)",
        title="Memory",
    )
    for ax in (time_ax, mem_ax):
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=sorted({op for op, _ in MAX_LENGTH}),
        help="only these ops (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="T ∈ {1024, 4096} only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=3.0,
        help="keep calling each function this long (best time wins)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--no-hugepages",
        action="store_true",
        help="keep glibc's default malloc (see the module docstring)",
    )
    args = parser.parse_args(argv)
    lengths = [1024, 4096] if args.quick else args.lengths

    gflops_before = matmul_gflops()
    print(f"1024³ matmul: {gflops_before:.1f} GFLOP/s")
    jobs = [
        (op, mode, t)
        for (op, mode), limit in MAX_LENGTH.items()
        for t in lengths
        if t <= limit and (args.ops is None or op in args.ops)
    ]
    rows = []
    for op, mode, length in tqdm(jobs, desc="benchmark", unit="run"):
        tqdm.write(f"{op:18s} {mode:9s} T={length}")
        rows.append(measure(op, mode, length, args.repeats, args.sample_seconds))
    # Measured before and after the runs; the higher (stricter) rate is the denominator.
    gflops = max(gflops_before, matmul_gflops())
    print(f"1024³ matmul: {gflops_before:.1f} before, {gflops:.1f} best")
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, gflops, info)
    (args.out / "ops.md").write_text(report)
    (args.out / "ops.json").write_text(
        json.dumps(
            {
                "machine": info,
                "matmul_gflops": gflops,
                "rows": [dataclasses.asdict(r) for r in rows],
            },
            indent=1,
        )
    )
    plot(rows, args.out / "ops.png")
    print(report)
    print(f"wrote {args.out / 'ops.md'}, ops.json, ops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
