"""Kernel benchmark (GPU): the Pallas kernels against XLA, flash attention and FLA.

    python -m experiments.bench.kernels              # on a GPU: full table, ~10 min
    python -m experiments.bench.kernels --smoke      # anywhere: tiny shapes, checks the harness

For the gated linear attention (``g [B, T, H]``) and the gated delta rule
(β in (0, 1)), bfloat16, H = 16, K = V = 128, B ∈ {1, 8}, T ∈ {2K, 8K, 32K}:
best-of-N time of the jitted forward and forward+backward of

* ``pallas``: ``ops.*(backend="pallas")`` (the Triton-lowered kernels),
* ``xla``: ``ops.*(backend="xla", mode="chunk")``,
* ``flash``: causal softmax attention, ``jax.nn.dot_product_attention(...,
  implementation="cudnn")`` on the same q, k, v,
* ``fla``: flash-linear-attention's Triton kernels (``chunk_simple_gla``,
  ``chunk_gated_delta_rule``) when ``torch`` and ``fla`` are importable — carry
  their wheels to the device machine; the row says "not installed" otherwise.

Writes ``kernels.md`` and ``kernels.png`` to ``experiments/results/`` with the
device named. ``--smoke`` runs T = 128 with one repeat, on the CPU too (the
kernels then run interpreted: the times mean nothing) and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xformjax import ops

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
HEADS, DIM = 16, 128
OPS = ("linear_attention", "delta_rule")
IMPLS = ("pallas", "xla", "flash", "fla")


@dataclasses.dataclass
class Row:
    op: str
    impl: str
    batch: int
    length: int
    forward_ms: float | None
    backward_ms: float | None
    note: str = ""


def best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def inputs(batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (batch, length, HEADS)
    q, k, v = (rng.standard_normal(shape + (DIM,)).astype(np.float32) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g = np.log(rng.uniform(0.9, 0.999, shape)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    return q, k, v, g, beta


def jax_fn(op: str, impl: str):
    if impl == "flash":
        return lambda q, k, v, g, beta: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    backend = "pallas" if impl == "pallas" else "xla"
    if op == "linear_attention":
        return lambda q, k, v, g, beta: ops.linear_attention(q, k, v, g=g, backend=backend)[0]
    return lambda q, k, v, g, beta: ops.delta_rule(q, k, v, beta, g=g, backend=backend)[0]


def measure_jax(op: str, impl: str, arrays, repeats: int) -> tuple[float, float]:
    q, k, v, g, beta = arrays
    args = (
        *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
        jnp.asarray(g),
        jnp.asarray(beta, jnp.bfloat16),
    )
    fn = jax_fn(op, impl)
    forward = jax.jit(fn)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    argnums = (0, 1, 2) if impl == "flash" else (0, 1, 2, 3) + ((4,) if op == "delta_rule" else ())
    backward = jax.jit(jax.grad(loss, argnums=argnums))
    return best_ms(forward, *args, repeats=repeats), best_ms(backward, *args, repeats=repeats)


def measure_fla(op: str, arrays, repeats: int) -> tuple[float, float]:
    import torch  # only on a machine that carries the wheels

    if op == "linear_attention":
        from fla.ops.simple_gla import chunk_simple_gla as kernel
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel
    q, k, v, g, beta = (torch.tensor(x, device="cuda") for x in arrays)
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    call = (
        (lambda: kernel(q, k, v, g=g)[0])
        if op == "linear_attention"
        else (lambda: kernel(q, k, v, g=g, beta=beta.to(torch.bfloat16))[0])
    )

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    return timed(call), timed(lambda: call().float().sum().backward())


def run(batches, lengths, repeats: int) -> list[Row]:
    rows = []
    plan = [(op, impl, b, t) for b in batches for t in lengths for op in OPS for impl in IMPLS]
    for op, impl, batch, length in tqdm(plan, desc="kernels", unit="run"):
        if impl == "flash" and op == "delta_rule":
            continue  # one flash row per shape, listed under linear_attention
        arrays = inputs(batch, length)
        try:
            times = (
                measure_fla(op, arrays, repeats)
                if impl == "fla"
                else measure_jax(op, impl, arrays, repeats)
            )
            rows.append(Row(op, impl, batch, length, *times))
        except ImportError:
            rows.append(Row(op, impl, batch, length, None, None, "not installed"))
        except Exception as error:  # a backend missing on this machine (cuDNN on CPU, …)
            rows.append(
                Row(
                    op,
                    impl,
                    batch,
                    length,
                    None,
                    None,
                    f"{type(error).__name__}: {str(error).splitlines()[0][:80]}",
                )
            )
    return rows


def markdown(rows: list[Row], device: str) -> str:
    cell = lambda x: "—" if x is None else f"{x:.2f}"
    lines = [
        f"# Kernel benchmark on {device}",
        "",
        f"jax {jax.__version__}; bfloat16, H={HEADS}, K=V={DIM}; best-of-N milliseconds.",
        "`flash` is causal softmax attention (cuDNN) on the same q, k, v.",
        "",
        "| op | impl | B | T | forward ms | fwd+bwd ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.impl} | {r.batch} | {r.length} | {cell(r.forward_ms)} | "
            f"{cell(r.backward_ms)} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(11, 4))
    for axis, op in zip(axes, OPS):
        for impl in IMPLS:
            pts = [
                (r.length, r.backward_ms)
                for r in rows
                if r.batch == 1
                and r.impl == impl
                and r.backward_ms is not None
                and (r.op == op or (impl == "flash" and r.op == "linear_attention"))
            ]
            if pts:
                axis.plot(*zip(*pts), marker="o", label=impl)
        axis.set(title=f"{op}, B=1, fwd+bwd", xlabel="T", ylabel="ms", xscale="log", yscale="log")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; write nothing")
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    if args.smoke:
        rows = run([1], [128], repeats=1)
        print(markdown(rows, device))
        return
    if jax.default_backend() != "gpu":
        raise SystemExit(
            f"the kernel benchmark needs a GPU; this machine has {device}. "
            "Use --smoke to check the harness."
        )
    rows = run([1, 8], [2048, 8192, 32768], repeats=10)
    text = markdown(rows, device)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.md").write_text(text)
    plot(rows, RESULTS / "kernels.png")


if __name__ == "__main__":
    main()
