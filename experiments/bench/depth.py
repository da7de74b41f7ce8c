"""Depth benchmark: compile time and memory of the LM train step vs depth, with and
without ``scan_layers``, and the step's memory under each ``remat`` policy.

    python -m experiments.bench.depth              # 4, 16, 48 layers; remat at 16
    python -m experiments.bench.depth --quick      # 2, 4 layers; remat at 4: a smoke run
    python -m experiments.bench                    # with the other benchmarks

A language model of d_model=128 (4 heads, float32), pattern ``gated_deltanet,attn``,
a byte vocabulary, at batch 4 × 256 tokens. For each depth and each of
``scan_layers`` off/on, the train step — ``jax.value_and_grad`` of the next-token
cross-entropy with respect to the parameters — is lowered and compiled (the compile
time is that wall time, lower + compile); its memory is XLA's plan,
``compiled.memory_analysis()``: temporary buffers, arguments (parameters and tokens)
and outputs (loss and gradients), and their sum, an upper bound of the peak (it does
not subtract buffers XLA may alias). The step's run time (best of three) and the
size of the optimised program text are recorded too. Then, at one depth, each
``LMConfig.remat`` policy with scanning on. Every point runs in its own process,
killed after ``--cap`` seconds (such a point is reported as over the cap). Writes
``depth.md``, ``depth.json`` and ``depth.png`` to ``experiments/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

from experiments.bench.ops import RESULTS, machine

ROOT = pathlib.Path(__file__).resolve().parents[2]
D_MODEL, HEADS, CHUNK = 128, 4, 64
PATTERN = "gated_deltanet,attn"
BATCH, SEQ = 4, 256
LAYERS = [4, 16, 48]
QUICK_LAYERS = [2, 4]
POLICIES = ["none", "full", "dots", "dots_no_batch"]
CAP_S = 180.0


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured train step (``compile_s`` is lower + compile wall time)."""

    layers: int
    scan: bool
    remat: str
    params: int
    lower_s: float
    compile_s: float
    temp_mib: float
    argument_mib: float
    output_mib: float
    step_ms: float
    hlo_kib: float

    @property
    def total_mib(self) -> float:
        return self.temp_mib + self.argument_mib + self.output_mib


@dataclasses.dataclass(frozen=True)
class Miss:
    """A point that did not finish: over the cap, or failed."""

    layers: int
    scan: bool
    remat: str
    reason: str


def model_config(layers: int, scan: bool, remat: str, d_model: int, pattern: str, seq: int):
    from xformjax.models import LMConfig

    return LMConfig(
        num_layers=layers,
        layer_pattern=pattern,
        remat=remat,
        scan_layers=scan,
    ).replace(
        **{
            "mixer.d_model": d_model,
            "mixer.num_heads": HEADS,
            "mixer.chunk_size": min(CHUNK, seq),
            "mixer.max_seq_len": seq,
        }
    )


def measure(
    layers: int,
    scan: bool,
    remat: str,
    *,
    d_model: int = D_MODEL,
    pattern: str = PATTERN,
    batch: int = BATCH,
    seq: int = SEQ,
) -> Point:
    """Build, lower, compile and run one train step in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.bench.ops import best_time
    from xformjax.models import LanguageModel, count_params

    config = model_config(layers, scan, remat, d_model, pattern, seq)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32
    )

    def loss(params, rest, tokens):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        log_probs = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    lowered = step.lower(params, rest, tokens)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds = best_time(compiled, params, rest, tokens, repeats=3, budget_s=2.0)
    mib = 2.0**-20
    return Point(
        layers=layers,
        scan=scan,
        remat=remat,
        params=count_params(model),
        lower_s=lower_s,
        compile_s=compile_s,
        temp_mib=memory.temp_size_in_bytes * mib,
        argument_mib=memory.argument_size_in_bytes * mib,
        output_mib=memory.output_size_in_bytes * mib,
        step_ms=seconds * 1e3,
        hlo_kib=len(compiled.as_text() or "") / 1024,
    )


def measure_in_child(
    layers: int, scan: bool, remat: str, cap_s: float, shape: list[str]
) -> Point | Miss:
    """:func:`measure` in a fresh process, killed after ``cap_s`` seconds."""
    command = [
        sys.executable,
        "-m",
        "experiments.bench.depth",
        "--point",
        str(layers),
        str(int(scan)),
        remat,
        *shape,
    ]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=cap_s, check=False
        )
    except subprocess.TimeoutExpired:
        return Miss(layers, scan, remat, f"over the {cap_s:g} s cap (killed)")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return Miss(layers, scan, remat, f"failed: {tail[:160]}")
    return Point(**json.loads(lines[-1]))


def run(
    layers: list[int],
    remat_layers: int,
    policies: list[str],
    *,
    cap_s: float,
    shape: list[str],
    in_process: bool = False,
    shape_kwargs: dict | None = None,
) -> list[Point | Miss]:
    """Every (depth, scan) point with remat ``none``, then each policy (scanned) at
    ``remat_layers``."""
    plan = [(n, scan, "none") for n in layers for scan in (False, True)]
    plan += [(remat_layers, True, p) for p in policies if (remat_layers, True, p) not in plan]
    results: list[Point | Miss] = []
    for index, (n, scan, remat) in enumerate(plan, 1):
        label = f"[{index}/{len(plan)}] layers={n} scan={scan} remat={remat}"
        print(label, end=" … ", flush=True)
        if in_process:
            result = measure(n, scan, remat, **(shape_kwargs or {}))
        else:
            result = measure_in_child(n, scan, remat, cap_s, shape)
        if isinstance(result, Point):
            print(
                f"compile {result.compile_s:.1f} s, temp {result.temp_mib:.1f} MiB, "
                f"total {result.total_mib:.1f} MiB, step {result.step_ms:.0f} ms",
                flush=True,
            )
        else:
            print(result.reason, flush=True)
        results.append(result)
    return results


def _find(results, layers: int, scan: bool, remat: str = "none"):
    for r in results:
        if (r.layers, r.scan, r.remat) == (layers, scan, remat):
            return r
    return None


def summary(results: list[Point | Miss], layers: list[int], remat_layers: int) -> str:
    """What the numbers show (every figure in it comes from ``results``)."""
    text = []
    low, high = min(layers), max(layers)
    for scan in (True, False) if high > low else ():
        a, b = _find(results, low, scan), _find(results, high, scan)
        name = "Scanned" if scan else "Unscanned"
        if isinstance(a, Point) and isinstance(b, Point):
            text.append(
                f"{name}: compiling the {high}-layer step took {b.compile_s:.1f} s, "
                f"{b.compile_s / a.compile_s:.1f}× the {low}-layer step's {a.compile_s:.1f} s "
                f"(optimised program {b.hlo_kib:,.0f} KiB vs {a.hlo_kib:,.0f} KiB)."
            )
        elif isinstance(a, Point) and isinstance(b, Miss):
            text.append(f"{name}: the {high}-layer step did not finish: {b.reason}.")
    for n in layers:
        plain, scanned = _find(results, n, False), _find(results, n, True)
        if isinstance(plain, Point) and isinstance(scanned, Point):
            text.append(
                f"At {n} layers the scanned step compiled in {scanned.compile_s:.1f} s vs "
                f"{plain.compile_s:.1f} s unrolled ({plain.compile_s / scanned.compile_s:.2f}×) "
                f"and plans {scanned.temp_mib:,.1f} MiB of temporaries vs "
                f"{plain.temp_mib:,.1f} MiB (step {scanned.step_ms:.0f} vs "
                f"{plain.step_ms:.0f} ms)."
            )
    base = _find(results, remat_layers, True)
    if isinstance(base, Point):
        for r in results:
            if isinstance(r, Point) and r.scan and r.layers == remat_layers and r.remat != "none":
                text.append(
                    f"remat={r.remat!r} at {remat_layers} layers: {r.temp_mib:,.1f} MiB of "
                    f"temporaries ({r.temp_mib / base.temp_mib:.2f}× remat='none'), step "
                    f"{r.step_ms / base.step_ms:.2f}× as long."
                )
    return " ".join(text)


def markdown(
    results: list[Point | Miss],
    layers: list[int],
    remat_layers: int,
    info: dict,
    shape: dict,
    cap_s: float,
    loaded: bool,
) -> str:
    lines = [
        "# Depth benchmark: scanned layers and rematerialisation",
        "",
        f"`python -m experiments.bench.depth` — {info['date']}, this {info['cores']}-core "
        f"{info['backend'].upper()}, {info['cpu']}, jax {info['jax']} ({info['device']}).",
        f"Train step of a language model with d_model={shape['d_model']}, {HEADS} heads, "
        f"pattern `{shape['pattern']}`, batch {shape['batch']} × {shape['seq']} tokens, "
        "float32: `jax.value_and_grad` of the next-token cross-entropy w.r.t. the "
        "parameters. **Compile** is the wall time of `lower` + `compile`. **Memory** is "
        "XLA's plan, `compiled.memory_analysis()`: temporaries (`temp`), arguments "
        "(parameters + tokens) and outputs (loss + gradients); `total` = their sum, an "
        "upper bound of the peak (buffers XLA aliases are not subtracted). Step: best "
        "of 3 runs. HLO: size of the optimised program's text. "
        + (
            f"Each point ran in its own process, killed after {cap_s:g} s."
            if cap_s
            else "All points ran in one process, without a time cap."
        ),
    ]
    if loaded:
        lines += [
            "",
            "Timings were taken on a shared, loaded CPU (other jobs ran at the same "
            "time): compile and step times are comparable within this run, not as "
            "absolute figures. Memory is XLA's plan and does not depend on the load.",
        ]
    lines += [
        "",
        "## Compile time and memory vs depth (remat = none)",
        "",
        "| layers | scan_layers | params | compile (s) | of which lower (s) | temp (MiB) "
        "| args (MiB) | outputs (MiB) | total (MiB) | step (ms) | HLO (KiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in layers:
        for scan in (False, True):
            r = _find(results, n, scan)
            if isinstance(r, Point):
                lines.append(
                    f"| {n} | {scan} | {r.params:,} | {r.compile_s:.1f} | {r.lower_s:.1f} "
                    f"| {r.temp_mib:,.1f} | {r.argument_mib:,.1f} | {r.output_mib:,.1f} "
                    f"| {r.total_mib:,.1f} | {r.step_ms:,.1f} | {r.hlo_kib:,.0f} |"
                )
            elif isinstance(r, Miss):
                lines.append(f"| {n} | {scan} | — | {r.reason} | | | | | | | |")
    lines += [
        "",
        f"## Train-step memory per remat policy ({remat_layers} layers, scan_layers=True)",
        "",
        "| remat | temp (MiB) | total (MiB) | temp vs none | compile (s) | step (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = _find(results, remat_layers, True)
    for r in results:
        if r.scan and r.layers == remat_layers:
            if isinstance(r, Point):
                ratio = f"{r.temp_mib / base.temp_mib:.2f}" if isinstance(base, Point) else "—"
                lines.append(
                    f"| {r.remat} | {r.temp_mib:,.1f} | {r.total_mib:,.1f} | {ratio} "
                    f"| {r.compile_s:.1f} | {r.step_ms:,.1f} |"
                )
            else:
                lines.append(f"| {r.remat} | {r.reason} | | | | |")
    lines += [
        "",
        "## Summary",
        "",
        summary(results, layers, remat_layers),
        "",
        "Scanning bounds the size of the program, not the activations: the backward pass "
        "still keeps every layer's residuals (the scan stacks them), so the step's memory "
        "grows with depth either way; a remat policy is what trades it for recomputation.",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[Point | Miss], remat_layers: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in results if isinstance(r, Point)]
    fig, (compile_ax, memory_ax, remat_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
    for scan, style in (
        (False, {"marker": "s", "color": "tab:blue"}),
        (True, {"marker": "o", "color": "tab:orange"}),
    ):
        series = sorted(
            (r for r in points if r.scan == scan and r.remat == "none"), key=lambda r: r.layers
        )
        label = "scan_layers=True" if scan else "unrolled"
        depth = [r.layers for r in series]
        compile_ax.plot(depth, [r.compile_s for r in series], label=label, **style)
        memory_ax.plot(depth, [r.temp_mib for r in series], label=f"{label}: temp", **style)
        memory_ax.plot(
            depth, [r.total_mib for r in series], label=f"{label}: total", ls=":", **style
        )
    compile_ax.set(xlabel="layers", ylabel="lower + compile (s)", title="Compile time")
    memory_ax.set(xlabel="layers", ylabel="MiB (XLA plan)", title="Train-step memory")
    remat = [r for r in points if r.scan and r.layers == remat_layers]
    remat_ax.bar([r.remat for r in remat], [r.temp_mib for r in remat], color="tab:green")
    remat_ax.set(ylabel="temp MiB", title=f"remat policies ({remat_layers} layers, scanned)")
    for ax in (compile_ax, memory_ax):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", help="depths (default: 4 16 48)")
    parser.add_argument("--remat-layers", type=int, help="depth of the remat table (16)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES)
    parser.add_argument("--quick", action="store_true", help="2 and 4 layers: a smoke run")
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--pattern", default=PATTERN)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--cap", type=float, default=CAP_S, help="seconds per point")
    parser.add_argument(
        "--in-process", action="store_true", help="no child processes (and no cap): tests"
    )
    parser.add_argument(
        "--loaded", action="store_true", help="say the CPU was shared with other jobs"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--no-hugepages", action="store_true", help="accepted for the suite; no effect here"
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite depth.md and depth.png from depth.json"
    )
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)  # LAYERS SCAN REMAT
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    shape_kwargs = {
        "d_model": args.d_model,
        "pattern": args.pattern,
        "batch": args.batch,
        "seq": args.seq,
    }
    if args.point:  # a child process: one point, as JSON on stdout
        layers, scan, remat = args.point
        point = measure(int(layers), bool(int(scan)), remat, **shape_kwargs)
        print(json.dumps(dataclasses.asdict(point)), flush=True)
        return 0
    if args.render:
        return render(args.out)
    layers = args.layers or (QUICK_LAYERS if args.quick else LAYERS)
    remat_layers = args.remat_layers or (4 if args.quick else 16)
    shape = [
        *("--d-model", str(args.d_model), "--pattern", args.pattern),
        *("--batch", str(args.batch), "--seq", str(args.seq)),
    ]
    results = run(
        layers,
        remat_layers,
        args.policies,
        cap_s=args.cap,
        shape=shape,
        in_process=args.in_process,
        shape_kwargs=shape_kwargs,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "depth.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "shape": shape_kwargs,
                "layers": layers,
                "remat_layers": remat_layers,
                "cap_s": 0.0 if args.in_process else args.cap,
                "loaded": args.loaded,
                "points": [
                    {"kind": type(r).__name__.lower(), **dataclasses.asdict(r)} for r in results
                ],
            },
            indent=1,
        )
    )
    return render(args.out)


def render(out: pathlib.Path) -> int:
    """Write ``depth.md`` and ``depth.png`` from ``depth.json`` in ``out``."""
    data = json.loads((out / "depth.json").read_text())
    results = [
        (Point if point.pop("kind") == "point" else Miss)(**point) for point in data["points"]
    ]
    layers, remat_layers = data["layers"], data["remat_layers"]
    text = markdown(
        results, layers, remat_layers, data["machine"], data["shape"], data["cap_s"], data["loaded"]
    )
    (out / "depth.md").write_text(text)
    plot(results, remat_layers, out / "depth.png")
    print(f"wrote {out / 'depth.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
