"""Multi-query associative recall across the families, by Zoology's protocol (Arora et
al. 2023) at a CPU-sized scale.

    python -m experiments.mqar             # d_model 64, 8 pairs: every family, 4 rates, 3 seeds
    python -m experiments.mqar --cross     # each width at 8 pairs, each pairs at d_model 64
    python -m experiments.mqar --full      # d_model 32/64/128 × 4/8/16 pairs (an accelerator)
    python -m experiments.mqar --no-conv   # the layers with a short convolution, without it
    python -m experiments.mqar --with-conv # the layers without one (linear attention, RetNet,
                                           # GLA), with it (``short_conv``)
    python -m experiments.mqar --quick     # 3 families, one setting, few steps: a smoke run
    python -m experiments.mqar --grid --widths 32 --pairs 4 8   # part of the CPU grid
    python -m experiments.mqar --grid --stored  # the CPU grid's table from the runs so far
    python -m experiments.mqar --vocab 128 ... # more keys than a head has dimensions

Each model reads ``k₁ v₁ … k_n v_n`` and then ``n`` of the keys again, and must
answer each with its value (32 keys, 32 values). The protocol:

1. every model (two layers, 2 heads) is trained at each learning rate of the sweep
   (AdamW, warm-up over the first 10 % of the cap, cosine decay, weight decay 0.1),
   on seed 0, until its validation accuracy reaches 99.5 % or, after half the step
   cap (recall can appear after a long flat stretch), plateaus (no gain of 0.5 points
   over 5 validations 100 steps apart), or the cap;
2. the rate with the best validation accuracy is the model's rate for the setting;
   seeds 1 and 2 are trained at that rate;
3. the table gives the held-out test accuracy at the chosen rate (mean ± spread over
   the seeds) and the rate.

The expected shape: softmax attention ≈ 100 % everywhere (it attends to the key
itself); the delta rule and Mixture-of-Memories close to it at larger widths; linear
attention, RetNet and GLA falling with more pairs and less width (a fixed-size state
holds fewer pairs). Writes ``mqar.md``, ``mqar.png`` and ``mqar.jsonl`` (every run,
resumable) to ``experiments/results/`` (``mqar_cross.md``, ``mqar_full.md`` for the
other sizes: :func:`output_name`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from experiments import report
from experiments.harness import (
    ModelSpec,
    ResultStore,
    Run,
    Stopping,
    add_workers_argument,
    overall_accuracy,
    run_all,
    small_lm,
)
from xformjax.data import MQAR
from xformjax.train.config import TrainConfig

MODELS = (
    ModelSpec("softmax attention", "attn"),
    ModelSpec("linear attention", "linear_attn"),
    ModelSpec("RetNet", "retnet"),
    ModelSpec("GLA", "gla"),
    ModelSpec("DeltaNet", "deltanet"),
    ModelSpec("gated DeltaNet", "gated_deltanet"),
    ModelSpec("MoM", "mom"),
    ModelSpec("Titans (MAL)", "titans"),
)
#: The short convolution ablation (``--no-conv``): the layers that have one, without.
#: Linear attention, RetNet and GLA have none (as in flash-linear-attention), so the
#: gap to the delta rule could be the convolution's doing as much as the state's.
WITHOUT_CONV = tuple(
    ModelSpec(f"{spec.label}, no conv", spec.layer_pattern, {"conv_size": 0})
    for spec in MODELS
    if spec.layer_pattern in ("deltanet", "gated_deltanet", "mom", "titans")
)
#: The other way round (``--with-conv``): the layers without one, given the same short
#: convolution (``short_conv``: SiLU(conv(·)) of length 4 on q, k, v).
WITH_CONV = tuple(
    ModelSpec(f"{spec.label}, short conv", spec.layer_pattern, {"short_conv": True})
    for spec in MODELS
    if spec.layer_pattern in ("linear_attn", "retnet", "gla")
)
VOCAB = 32  # keys and values each, unless ``--vocab``
BATCH = 32


@dataclasses.dataclass(frozen=True)
class Grid:
    """The settings swept: widths × pairs (or, with ``cross``, only the cross through
    the middle width and pairs: each width at the middle pairs, each pairs at the
    middle width), the learning rates tried on seed 0, the seeds trained at the best
    rate, the step cap, the number of keys (and of values) the tasks draw from, and
    whether a run may stop on a plateau (after half the cap) or only at the target or
    the cap (``plateau=False``: for a late phase transition after a long flat stretch)."""

    widths: tuple[int, ...]
    pairs: tuple[int, ...]
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    cap: int
    every: int = 100
    cross: bool = False
    vocab: int = VOCAB
    plateau: bool = True

    @property
    def settings(self) -> list[tuple[int, int]]:
        """The (width, pairs) cells, widths outer."""
        cells = [(w, p) for w in self.widths for p in self.pairs]
        if self.cross:
            width, pairs = self.widths[len(self.widths) // 2], self.pairs[len(self.pairs) // 2]
            cells = [(w, p) for w, p in cells if w == width or p == pairs]
        return cells


GRIDS = {
    # ≈ 30 minutes on 2 CPU cores
    "default": Grid((64,), (8,), (3e-4, 1e-3, 3e-3, 1e-2), (0, 1, 2), cap=1500),
    # the whole grid: an accelerator's job
    "full": Grid((32, 64, 128), (4, 8, 16), (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (0, 1, 2), 5000),
    # the protocol over the whole grid on 2 CPU cores: about 8 hours, so run it a few
    # cells at a time (``--widths``, ``--pairs``) and gather them with ``--stored``
    "grid": Grid((32, 64, 128), (4, 8, 16), (3e-4, 1e-3, 3e-3, 1e-2), (0, 1, 2), cap=1500),
    # the grid's cross on 2 CPU cores (29 minutes on the Intel VM): one seed at 3e-3, the rate
    # within 0.3 points of every model's best at d=64, 8 pairs
    "cross": Grid((32, 64, 128), (4, 8, 16), (3e-3,), (0,), cap=1500, cross=True),
    "quick": Grid((32,), (4,), (1e-3, 3e-3), (0,), cap=40, every=20),
}


def tasks(num_pairs: int, seed: int, vocab: int = VOCAB) -> tuple[MQAR, MQAR, MQAR]:
    """Training, validation and test tasks (distinct seeds) with ``num_pairs`` pairs of
    ``vocab`` keys and ``vocab`` values."""

    def task(offset: int) -> MQAR:
        return MQAR(
            seed=offset + seed,
            num_pairs=num_pairs,
            num_queries=num_pairs,
            num_keys=vocab,
            num_values=vocab,
        )

    return task(0), task(20_000), task(10_000)


def run_name(
    spec: ModelSpec,
    width: int,
    pairs: int,
    rate: float,
    seed: int,
    cap: int,
    vocab: int = VOCAB,
    plateau: bool = True,
) -> str:
    """The run's key in ``mqar.jsonl`` (the vocabulary and the plateau rule named only
    when not the default)."""
    name = f"{spec.label}|d={width}|pairs={pairs}|lr={rate:g}|seed {seed}|cap {cap}"
    name += "" if vocab == VOCAB else f"|vocab {vocab}"
    return name + ("" if plateau else "|to cap")


def make_run(spec: ModelSpec, width: int, pairs: int, rate: float, seed: int, grid: Grid) -> Run:
    train_task, validation, test = tasks(pairs, seed, grid.vocab)
    train = TrainConfig(
        steps=grid.cap,
        batch_size=BATCH,
        learning_rate=rate,
        warmup_steps=grid.cap // 10,
        weight_decay=0.1,
        seed=seed,
    )
    model = spec.config(small_lm(d_model=width, chunk_size=8), train_task.vocab_size)
    return Run(
        run_name(spec, width, pairs, rate, seed, grid.cap, grid.vocab, grid.plateau),
        model,
        train,
        train_task,
        {"test": test},
        Stopping(
            validation, every=grid.every, min_steps=grid.cap // 2 if grid.plateau else grid.cap
        ),
    )


def best_validation(record) -> float:
    """The run's best validation accuracy (its last test score if it has no curve)."""
    curve = record.get("validation") or []
    return max(score for _, score in curve) if curve else overall_accuracy(record, "test")


def choose_rate(records: dict[float, dict]) -> float:
    """The learning rate whose seed-0 run reached the best validation accuracy (ties:
    the one that got there in fewer steps)."""
    return max(records, key=lambda rate: (best_validation(records[rate]), -records[rate]["steps"]))


def run_grid(models, grid: Grid, store: ResultStore, progress: bool, workers: int = 1) -> dict:
    """Phase 1 (the rate sweep on the first seed), then phase 2 (the other seeds at the
    chosen rate); returns ``{(label, width, pairs): (rate, [records], {rate: record})}``."""
    first, *others = grid.seeds
    settings = [(spec, w, p) for w, p in grid.settings for spec in models]
    sweep = [
        make_run(spec, w, p, rate, first, grid)
        for spec, w, p in settings
        for rate in grid.learning_rates
    ]
    records = iter(run_all(sweep, store, progress=progress, workers=workers))
    swept = {
        (spec.label, w, p): {rate: next(records) for rate in grid.learning_rates}
        for spec, w, p in settings
    }
    chosen = {key: choose_rate(by_rate) for key, by_rate in swept.items()}
    repeats = [
        make_run(spec, w, p, chosen[spec.label, w, p], seed, grid)
        for spec, w, p in settings
        for seed in others
    ]
    repeated = iter(run_all(repeats, store, progress=progress, workers=workers))
    table = {}
    for spec, w, p in settings:
        key = (spec.label, w, p)
        runs = [swept[key][chosen[key]]] + [next(repeated) for _ in others]
        table[key] = (chosen[key], runs, swept[key])
    return table


def stored_table(
    models, grid: Grid, store: ResultStore
) -> tuple[dict, dict[tuple[int, int], list[str]]]:
    """:func:`run_grid`'s table from the runs already in ``store``, training none: a
    model's cell is kept once its rate sweep is complete, with the seeds stored at its
    chosen rate (fewer than the grid's while its repeats are owed). Also returns, per
    ``(width, pairs)``, the labels of the models whose sweep there is incomplete."""
    first, *others = grid.seeds
    table: dict = {}
    missing: dict[tuple[int, int], list[str]] = {}
    for spec in models:  # models outer: the table's rows keep the models' order
        for w, p in grid.settings:
            key = (spec.label, w, p)
            names = {
                r: run_name(spec, w, p, r, first, grid.cap, grid.vocab, grid.plateau)
                for r in grid.learning_rates
            }
            if not all(name in store for name in names.values()):
                missing.setdefault((w, p), []).append(spec.label)
                continue
            by_rate = {rate: store.results[name] for rate, name in names.items()}
            rate = choose_rate(by_rate)
            repeats = (
                run_name(spec, w, p, rate, seed, grid.cap, grid.vocab, grid.plateau)
                for seed in others
            )
            runs = [by_rate[rate]] + [store.results[n] for n in repeats if n in store]
            table[key] = (rate, runs, by_rate)
    return table, missing


def owed_sweeps(missing: dict[tuple[int, int], list[str]]) -> str:
    """The grid's own models (not the convolution variants) still without a complete
    rate sweep, cell by cell, or ``"none"``."""
    grid_models = {spec.label for spec in MODELS}
    owed = {cell: [m for m in labels if m in grid_models] for cell, labels in missing.items()}
    cells = [f"d={w}, pairs={p}: {', '.join(m)}" for (w, p), m in sorted(owed.items()) if m]
    return "; ".join(cells) or "none"


def summarise(table: dict, grid: Grid) -> list[str]:
    lines = report.header("Multi-query associative recall (Zoology's protocol)")
    lines += [
        f"Two-layer models, 2 heads, batches of {BATCH} sequences; {grid.vocab} keys and "
        f"{grid.vocab} values, as many queries as pairs (chance {100 / grid.vocab:.1f} %). "
        "Learning rates "
        f"{', '.join(f'{r:g}' for r in grid.learning_rates)} tried on seed {grid.seeds[0]}; "
        f"training stops when the validation accuracy (256 sequences, every {grid.every} "
        f"steps) reaches 99.5 %"
        + (
            f" or, after {grid.cap // 2} steps, gains < 0.5 points over 5 validations"
            if grid.plateau
            else " (no plateau stop)"
        )
        + f", at most {grid.cap} steps (warm-up {grid.cap // 10}, cosine decay, AdamW, "
        "weight decay 0.1). The rate with the best validation accuracy is kept and seeds "
        f"{', '.join(map(str, grid.seeds[1:])) or '—'} trained at it. Cells: query "
        "accuracy on 256 held-out test sequences, in % (mean ± std (min–max) over the "
        "seeds), then the rate.",
        *(
            [
                "",
                "The grid's cross: each width at the middle pairs and each pairs at the "
                "middle width, with the rates and seeds above, not the protocol's whole "
                "sweep (that is `--full`).",
            ]
            if grid.cross
            else []
        ),
        "",
    ]
    settings = sorted({(w, p) for _, w, p in table})
    labels = list(dict.fromkeys(label for label, _, _ in table))

    def cell(key) -> str:
        if key not in table:
            return "—"
        rate, runs, _ = table[key]
        finite = [r for r in runs if r["finite"]]
        text = report.mean_and_spread([overall_accuracy(r, "test") for r in finite])
        diverged = len(runs) - len(finite)
        owed = len(runs) < len(grid.seeds)
        return (
            f"{text} @ {rate:g}"
            + (f", {diverged} diverged" if diverged else "")
            + (f", {len(runs)} of {len(grid.seeds)} seeds" if owed else "")
        )

    rows = [[label] + [cell((label, w, p)) for w, p in settings] for label in labels]
    lines += report.table(["model"] + [f"d={w}, pairs={p}" for w, p in settings], rows)
    lines += ["", "## Every learning rate (seed 0): best validation accuracy, steps run", ""]
    sweep_rows = []
    for label in labels:
        for w, p in settings:
            if (label, w, p) not in table:
                continue
            _, _, by_rate = table[label, w, p]
            sweep_rows.append(
                [f"{label}, d={w}, pairs={p}"]
                + [
                    f"{100 * best_validation(r):.1f} ({r['steps']}, {r['stopped']})"
                    for r in by_rate.values()
                ]
            )
    rates = next(iter(table.values()))[2].keys()
    lines += report.table(["model, setting"] + [f"lr {r:g}" for r in rates], sweep_rows)
    seconds = sum(
        r["train_seconds"]
        for _, runs, by_rate in table.values()
        for r in [*by_rate.values(), *runs[1:]]
    )
    lines += ["", f"Training time, all runs: {seconds / 60:.1f} min.", ""]
    return lines


def plot(table: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(w, p) for _, w, p in table})
    labels = list(dict.fromkeys(label for label, _, _ in table))
    fig, ax = plt.subplots(figsize=(max(9.0, 1.4 * len(settings)), 4.2))
    width = 0.8 / max(1, len(labels))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")  # 15 labels stay apart
    colours = palette(np.arange(len(labels)))
    for i, label in enumerate(labels):
        values = [
            np.mean([overall_accuracy(r, "test") for r in table[label, w, p][1]])
            if (label, w, p) in table
            else np.nan
            for w, p in settings
        ]
        ax.bar(np.arange(len(settings)) + i * width, values, width, label=label, color=colours[i])
    ax.set_xticks(
        np.arange(len(settings)) + 0.4 - width / 2, [f"d={w}\n{p} pairs" for w, p in settings]
    )
    ax.set(ylabel="query accuracy (best rate)", ylim=(0, 1.02), title="MQAR, Zoology's protocol")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes too
    plt.close(fig)


def output_name(
    size: str,
    widths: Sequence[int] | None = None,
    pairs: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
    no_conv: bool = False,
    with_conv: bool = False,
    vocab: int = VOCAB,
    plateau: bool = True,
) -> str:
    """The results' file name (without suffix): ``mqar`` for the default grid,
    ``mqar_<size>`` for the others, and what was narrowed after it, so that a run on
    part of a grid, or the ablation, writes a table of its own instead of overwriting
    the grid's: ``--widths 64 --pairs 16 --families attn`` writes
    ``mqar_d64_pairs16_attn``."""
    parts = ["mqar"] if size == "default" else ["mqar", size]
    parts += ["d" + "-".join(map(str, widths))] if widths else []
    parts += ["pairs" + "-".join(map(str, pairs))] if pairs else []
    parts += ["-".join(family.replace(",", "+") for family in families)] if families else []
    parts += ["no_conv"] if no_conv else []
    parts += ["with_conv"] if with_conv else []
    parts += [f"vocab{vocab}"] if vocab != VOCAB else []
    parts += [] if plateau else ["to_cap"]
    return "_".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the whole grid (an accelerator)")
    size.add_argument(
        "--cross", action="store_true", help="each width at 8 pairs, each pairs at d=64"
    )
    size.add_argument("--quick", action="store_true", help="a smoke run")
    size.add_argument(
        "--grid", action="store_true", help="the whole grid with the CPU protocol (hours)"
    )
    parser.add_argument(
        "--stored",
        action="store_true",
        help="train nothing: the table of the runs already stored (every variant)",
    )
    parser.add_argument("--widths", type=int, nargs="+", help="override the grid's widths")
    parser.add_argument("--pairs", type=int, nargs="+", help="override the grid's pairs")
    parser.add_argument("--families", nargs="+", help="layer names to keep (default: all)")
    conv = parser.add_mutually_exclusive_group()
    conv.add_argument(
        "--no-conv",
        action="store_true",
        help="the layers with a short convolution, without it (conv_size 0)",
    )
    conv.add_argument(
        "--with-conv",
        action="store_true",
        help="linear attention, RetNet and GLA with a short convolution (short_conv)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=VOCAB,
        help=f"keys (and values) the pairs are drawn from (default {VOCAB}); more keys than "
        "a head has dimensions keeps them from being orthogonal",
    )
    parser.add_argument(
        "--to-cap",
        action="store_true",
        help="no plateau stop: train each run until the target or the cap (attention's "
        "induction phase transition can follow a long flat stretch)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    add_workers_argument(parser)
    args = parser.parse_args(argv)
    size_name = next((n for n in ("full", "cross", "quick", "grid") if getattr(args, n)), "default")
    grid = GRIDS[size_name]
    if args.widths:
        grid = dataclasses.replace(grid, widths=tuple(args.widths))
    if args.pairs:
        grid = dataclasses.replace(grid, pairs=tuple(args.pairs))
    if args.vocab < max(grid.pairs):
        parser.error(f"--vocab {args.vocab} is fewer keys than {max(grid.pairs)} pairs need")
    grid = dataclasses.replace(grid, vocab=args.vocab, plateau=not args.to_cap)
    candidates = WITHOUT_CONV if args.no_conv else WITH_CONV if args.with_conv else MODELS
    if args.stored and not (args.no_conv or args.with_conv):
        candidates = MODELS + WITH_CONV + WITHOUT_CONV
    models = [m for m in candidates if not args.families or m.layer_pattern in args.families]
    if args.quick and not args.families:
        models = [m for m in candidates if m.layer_pattern in ("attn", "linear_attn", "deltanet")]
    if not models:
        parser.error(f"--families matches none of {[m.layer_pattern for m in candidates]}")
    store = ResultStore(args.out / "mqar.jsonl")
    missing: dict[tuple[int, int], list[str]] = {}
    if args.stored:
        table, missing = stored_table(models, grid, store)
        if not table:
            parser.error(f"no cell of this grid has a complete rate sweep in {store.path}")
    else:
        table = run_grid(models, grid, store, not args.no_progress, args.workers)
    lines = summarise(table, grid)
    if args.stored:
        lines += [
            f"Gathered from `{store.path.name}` with `--stored` (no training). Rate sweeps "
            f"still owed: {owed_sweeps(missing)}.",
            "",
        ]
    output = output_name(
        size_name,
        args.widths,
        args.pairs,
        args.families,
        args.no_conv,
        args.with_conv,
        args.vocab,
        not args.to_cap,
    )
    plot(table, args.out / f"{output}.png")
    lines += [f"![mqar]({output}.png)", ""]
    (args.out / f"{output}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
