"""Layer benchmark: training tokens/s of every family's layer over T (speed vs length).

    python -m experiments.bench.layers              # full run: every family, T = 1K … 64K
    python -m experiments.bench.layers --quick      # T ∈ {1K, 4K}, three families: a smoke run
    python -m experiments.bench                     # the op benchmark, then this one

Lightning attention claims "constant speed for any length": a linear-time layer
should process as many training tokens per second at 64K as at 1K. For every
sequence mixer registered in :data:`xformjax.nn.MIXERS`, built with
``MixerConfig(d_model=256, num_heads=4, mode="chunk")`` in float32 (the library's
defaults otherwise), this times one jitted training step, the gradient of
``mean(y²)`` (plus the mixer's auxiliary loss, if any) with respect to the
parameters and the input, at B=1 and T from 1K to 64K, and reports B·T / step
time. Softmax attention (and sigmoid attention) run for comparison while they
fit: a family stops at the first T whose step is predicted — from the growth
between its last two lengths — to take longer than ``--budget`` seconds, whose
planned memory exceeds what the device has, or that fails; the table says where
and why. Writes ``layers.md`` (table, the longest-T / 1K ratio and a summary
filled from the numbers), ``layers.json`` and ``layers.png`` to
``experiments/results/`` with the machine recorded.

Like the op benchmark, the process re-executes itself with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless ``--no-hugepages`` is given
(see :mod:`experiments.bench.ops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.bench.ops import RESULTS, best_time, machine, reexec_with_hugepages
from xformjax import nn

BATCH, D_MODEL, HEADS = 1, 256, 4
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [1024, 4096]
QUICK_FAMILIES = ["attn", "lightning", "gated_deltanet"]
# Registered mixers left out of the default run, with the reason (none today:
# every entry of MIXERS is a sequence mixer with a chunked training form).
SKIPPED: dict[str, str] = {}
# "Constant speed": tokens/s at the longest T within this fraction of T=1K's.
CONSTANT_WITHIN = 0.2


def default_families() -> list[str]:
    """Every registered mixer not in :data:`SKIPPED`, the quadratic baselines first."""
    names = [name for name in nn.MIXERS if name not in SKIPPED]
    return sorted(names, key=lambda name: not is_quadratic(name))


def is_quadratic(family: str) -> bool:
    """Softmax-style attention: its training form costs O(T²) time."""
    return issubclass(nn.MIXERS[family], nn.Attention)


@dataclasses.dataclass(frozen=True)
class Row:
    family: str
    length: int
    step_ms: float  # forward + backward, best of several
    temp_mib: float  # XLA's planned temporary memory of the step
    compile_s: float

    @property
    def tokens_per_s(self) -> float:
        return BATCH * self.length / (self.step_ms / 1e3)


@dataclasses.dataclass(frozen=True)
class Stop:
    family: str
    length: int  # the first T not run; every longer one is skipped too
    kind: str  # "time", "memory" or "error"
    detail: str


def config_for(length: int) -> nn.MixerConfig:
    # max_seq_len only sets sigmoid attention's bias and the default cache size
    return nn.MixerConfig(
        d_model=D_MODEL,
        num_heads=HEADS,
        mode="chunk",
        dtype="float32",
        param_dtype="float32",
        max_seq_len=length,
    )


def training_step(family: str, length: int):
    """The jitted gradient step of ``family`` at ``length`` and its arguments."""
    layer = nn.MIXERS[family](config_for(length), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x, rest):
        y, state = nnx.merge(graphdef, params, rest)(x, mode="chunk")
        # Mixture-of-Memories' load-balance loss, so its router trains as in the trainer
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + getattr(state, "aux_loss", 0.0)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, length, D_MODEL)), jnp.float32)
    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x, rest)


def memory_limit_bytes() -> float:
    """What one step may plan to use: 90 % of the accelerator's memory, or 60 % of
    the host's RAM on the CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * stats["bytes_limit"]
    return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(
    family: str, length: int, repeats: int, sample_s: float = 1.5, memory_limit: float | None = None
) -> Row | Stop:
    """One (family, T) point: a :class:`Row`, or a :class:`Stop` when the step's
    planned memory exceeds ``memory_limit`` bytes or compiling/running it fails."""
    try:
        step, args = training_step(family, length)
        start = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        planned = (
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )
        if memory_limit is not None and planned > memory_limit:
            return Stop(
                family,
                length,
                "memory",
                f"{planned / 2**30:.1f} GiB planned > {memory_limit / 2**30:.1f} GiB available",
            )
        seconds = best_time(compiled, *args, repeats=repeats, budget_s=sample_s)
    except Exception as error:  # out of memory, or a form that fails to lower
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return Stop(family, length, "error", f"{type(error).__name__}: {first_line[:160]}")
    return Row(family, length, seconds * 1e3, memory.temp_size_in_bytes / 2**20, compile_s)


def predicted_seconds(rows: list[Row], length: int) -> float:
    """Step time at ``length`` extrapolated from the family's last two points
    (time ∝ T^p with p clamped to [1, 2]; p = 1 after a single point)."""
    last = rows[-1]
    exponent = 1.0
    if len(rows) >= 2:
        before = rows[-2]
        exponent = math.log(last.step_ms / before.step_ms) / math.log(last.length / before.length)
        exponent = min(max(exponent, 1.0), 2.0)
    return last.step_ms / 1e3 * (length / last.length) ** exponent


def run(
    families: list[str],
    lengths: list[int],
    *,
    repeats: int,
    budget_s: float,
    sample_s: float = 1.5,
    progress: bool = True,
) -> tuple[list[Row], list[Stop]]:
    """Measure every (family, T), skipping a family's longer lengths once it stops."""
    limit = memory_limit_bytes()
    rows: list[Row] = []
    stops: list[Stop] = []
    stopped: set[str] = set()
    bar = tqdm(total=len(families) * len(lengths), desc="layers", unit="run", disable=not progress)
    for family in families:
        done: list[Row] = []
        for length in lengths:
            bar.set_postfix_str(f"{family} T={length}")
            if family in stopped:
                bar.update()
                continue
            stop = None
            if done and (guess := predicted_seconds(done, length)) > budget_s:
                stop = Stop(
                    family,
                    length,
                    "time",
                    f"one step predicted at ~{guess:.0f} s > the {budget_s:g} s "
                    f"budget ({done[-1].step_ms / 1e3:.1f} s at T={done[-1].length})",
                )
            else:
                result = measure(family, length, repeats, sample_s, limit)
                if isinstance(result, Row):
                    done.append(result)
                    tqdm.write(
                        f"{family:15s} T={length:6d} {result.step_ms:10.1f} ms "
                        f"{result.tokens_per_s:12,.0f} tokens/s"
                    )
                else:
                    stop = result
            if stop is not None:
                stops.append(stop)
                stopped.add(family)
                tqdm.write(f"{family:15s} T={length:6d} stopped ({stop.kind}): {stop.detail}")
            bar.update()
        rows += done
    bar.close()
    return rows, stops


def short_length(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def ratios(rows: list[Row]) -> dict[str, tuple[int, float]]:
    """Per family: its longest measured T and tokens/s there over its shortest T's."""
    out = {}
    for family in dict.fromkeys(r.family for r in rows):
        series = sorted((r for r in rows if r.family == family), key=lambda r: r.length)
        out[family] = (series[-1].length, series[-1].tokens_per_s / series[0].tokens_per_s)
    return out


def summary(rows: list[Row], stops: list[Stop], lengths: list[int]) -> str:
    """A paragraph stating what the numbers show (nothing in it is written by hand)."""
    if not rows:
        return "No measurement finished."
    first, longest = min(lengths), max(lengths)
    at_first = sorted((r for r in rows if r.length == first), key=lambda r: -r.tokens_per_s)
    ratio = ratios(rows)
    text = []
    if len(at_first) > 1:
        fast, slow = at_first[0], at_first[-1]
        text.append(
            f"At T = {short_length(first)} the fastest layer is `{fast.family}` "
            f"({fast.tokens_per_s:,.0f} tokens/s) and the slowest `{slow.family}` "
            f"({slow.tokens_per_s:,.0f} tokens/s)."
        )
    full = {f: r for f, (t, r) in ratio.items() if t == longest and not is_quadratic(f)}
    if full and longest > first:
        best, worst = max(full, key=full.get), min(full, key=full.get)
        steady = [f for f, r in full.items() if r >= 1 - CONSTANT_WITHIN]
        slowing = [f for f, r in full.items() if r < 1 - CONSTANT_WITHIN]
        spread = (
            f"{100 * full[best]:.0f} % (`{best}`)"
            if best == worst
            else f"between {100 * full[worst]:.0f} % (`{worst}`) and "
            f"{100 * full[best]:.0f} % (`{best}`)"
        )
        text.append(
            f"Of the {len(full)} sub-quadratic layer{'s' * (len(full) > 1)} reaching "
            f"{short_length(longest)}, tokens/s there is {spread} of tokens/s at "
            f"{short_length(first)}."
        )
        text.append(
            f"Within {100 * CONSTANT_WITHIN:.0f} % of constant speed: "
            + (", ".join(f"`{f}`" for f in steady) or "none")
            + "; slower at length: "
            + (", ".join(f"`{f}` ({100 * full[f]:.0f} %)" for f in slowing) or "none")
            + "."
        )
    for stop in stops:
        if is_quadratic(stop.family) or stop.family not in full:
            reached = ratio.get(stop.family)
            kept = (
                f", keeping {100 * reached[1]:.0f} % of its {short_length(first)} "
                f"throughput at {short_length(reached[0])}"
                if reached
                else ""
            )
            text.append(
                f"`{stop.family}` stops before {short_length(stop.length)} "
                f"({stop.kind}: {stop.detail}){kept}."
            )
    for family in (f for f in ratio if is_quadratic(f)):
        top = ratio[family][0]
        others = [r for r in rows if r.length == top and not is_quadratic(r.family)]
        mine = next(r for r in rows if r.family == family and r.length == top)
        if others and top > first:
            fastest = max(others, key=lambda r: r.tokens_per_s)
            text.append(
                f"At {short_length(top)}, `{fastest.family}` trains "
                f"{fastest.tokens_per_s / mine.tokens_per_s:.1f}× as many tokens/s "
                f"as `{family}`."
            )
    return " ".join(text)


def markdown(
    rows: list[Row],
    stops: list[Stop],
    families: list[str],
    lengths: list[int],
    info: dict,
    budget_s: float,
) -> str:
    by = {(r.family, r.length): r for r in rows}
    first_stop = {s.family: s for s in stops}
    ratio = ratios(rows)
    header = " | ".join(short_length(t) for t in lengths)
    lines = [
        "# Layer benchmark: speed vs length",
        "",
        f"`python -m experiments.bench.layers` — {info['date']}, {info['cpu']}, "
        f"{info['cores']} cores, jax {info['jax']} ({info['backend']}, "
        f"{info['device']}), GLIBC_TUNABLES=`{info['glibc_tunables'] or 'unset'}`.",
        f"Each family's layer at d_model={D_MODEL}, {HEADS} heads, float32, mode "
        "`chunk`, the library's defaults otherwise; one jitted training step (gradient "
        f"of mean(y²) w.r.t. parameters and input) at B={BATCH}, best of several runs. "
        f"A family stops at the first T whose step is predicted to exceed "
        f"{budget_s:g} s, that does not fit in memory, or that fails.",
        "",
        "## Training tokens/s (forward + backward)",
        "",
        f"| family | {header} | longest T / {short_length(lengths[0])} |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for family in families:
        cells = []
        for length in lengths:
            row = by.get((family, length))
            stop = first_stop.get(family)
            if row:
                cells.append(f"{row.tokens_per_s:,.0f}")
            elif stop and stop.length == length:
                cells.append(f"stop ({stop.kind})")
            else:
                cells.append("—")
        if family in ratio and ratio[family][0] > lengths[0]:
            top, value = ratio[family]
            cells.append(
                f"{value:.2f}" + ("" if top == lengths[-1] else f" (at {short_length(top)})")
            )
        else:
            cells.append("—")
        name = f"{family} (quadratic)" if is_quadratic(family) else family
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Summary", "", summary(rows, stops, lengths)]
    if stops:
        lines += ["", "## Stopped", ""]
        lines += [f"- `{s.family}` before T={s.length} ({s.kind}): {s.detail}" for s in stops]
    lines += [
        "",
        "## Step time (ms) and planned temporary memory (MiB)",
        "",
        f"| family | {header} |",
        "|---|" + "---:|" * len(lengths),
    ]
    for family in families:
        cells = [
            f"{by[(family, t)].step_ms:,.1f} ms / {by[(family, t)].temp_mib:,.0f} MiB"
            if (family, t) in by
            else "—"
            for t in lengths
        ]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    if SKIPPED:
        lines += ["", "Not run: " + "; ".join(f"`{f}`: {why}" for f, why in SKIPPED.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = plt.get_cmap("tab20").colors
    colors = colors[0::2] + colors[1::2]  # the ten strong colours first
    for index, family in enumerate(dict.fromkeys(r.family for r in rows)):
        series = sorted((r for r in rows if r.family == family), key=lambda r: r.length)
        style = dict(
            color=colors[index % len(colors)],
            label=family,
            **({"marker": "s", "ls": "--"} if is_quadratic(family) else {"marker": "o"}),
        )
        lengths = [r.length for r in series]
        rate_ax.plot(lengths, [r.tokens_per_s for r in series], **style)
        ratio_ax.plot(lengths, [r.tokens_per_s / series[0].tokens_per_s for r in series], **style)
    rate_ax.set(yscale="log", ylabel="training tokens/s", title="Forward + backward throughput")
    ratio_ax.set(
        yscale="log",
        ylabel="tokens/s relative to the shortest T",
        title=f"Constant speed: flat at 1 (band: ±{100 * CONSTANT_WITHIN:.0f} %)",
    )
    ratio_ax.axhline(1.0, color="grey", lw=0.8)
    ratio_ax.axhspan(1 - CONSTANT_WITHIN, 1 + CONSTANT_WITHIN, color="grey", alpha=0.15)
    ticks = sorted({r.length for r in rows})
    for ax in (rate_ax, ratio_ax):
        ax.set(xscale="log", xlabel="T (tokens)")
        ax.set_xticks(ticks, [short_length(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, alpha=0.3)
    handles, labels = rate_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families",
        nargs="+",
        choices=sorted(nn.MIXERS),
        metavar="FAMILY",
        help=f"mixers to run (default: all of {', '.join(default_families())})",
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", help=f"T values (default: {', '.join(map(str, LENGTHS))})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"T ∈ {{1024, 4096}} and {', '.join(QUICK_FAMILIES)} "
        "(unless --families/--lengths say otherwise)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="seconds one training step may take (default 30); a family "
        "stops before the T predicted to exceed it",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=1.5,
        help="keep timing short steps for this long (default 1.5)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--no-hugepages",
        action="store_true",
        help="keep glibc's default malloc (see experiments.bench.ops)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    lengths = sorted(set(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)))
    families = args.families or (QUICK_FAMILIES if args.quick else default_families())
    started = time.perf_counter()
    rows, stops = run(
        families,
        lengths,
        repeats=args.repeats,
        budget_s=args.budget,
        sample_s=args.sample_seconds,
        progress=not args.no_progress,
    )
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, stops, families, lengths, info, args.budget)
    (args.out / "layers.md").write_text(report)
    (args.out / "layers.json").write_text(
        json.dumps(
            {
                "machine": info,
                "settings": {
                    "batch": BATCH,
                    "d_model": D_MODEL,
                    "num_heads": HEADS,
                    "dtype": "float32",
                    "mode": "chunk",
                    "lengths": lengths,
                    "families": families,
                    "budget_s": args.budget,
                    "repeats": args.repeats,
                    "skipped_families": SKIPPED,
                },
                "rows": [{**dataclasses.asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows],
                "stops": [dataclasses.asdict(s) for s in stops],
                "seconds": time.perf_counter() - started,
            },
            indent=1,
        )
    )
    plot(rows, args.out / "layers.png")
    print(report)
    print(
        f"wrote {args.out / 'layers.md'}, layers.json, layers.png "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv[1:], "experiments.bench.layers")
    sys.exit(main(sys.argv[1:]))
